"""Int8 matmul kernel registry and selection: per-platform priorities, the ``kernel`` context
manager and ``explain`` (the same pattern as ``transformax.attention.select``).

Of the kernels allowed and able to run a problem, the current platform runs the one measured
fastest on this host (``quant.tune``: tuning cache, or autotuning) or, unmeasured, a host
default (a native kernel up to its measured row crossover; bf16 for many rows) or the first in
its static priority; other platforms (which cannot be timed here) by priority alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
from collections.abc import Iterable
from typing import ClassVar

from transformax import selection
from transformax.attention.primitive import current_platform
from transformax.attention.select import PLATFORMS
from transformax.quant import tune
from transformax.quant.problem import Problem


class Kernel(str, enum.Enum):
    """The int8 matmul kernels transformax knows."""

    DEQUANT = "dequant"
    XLA_INT8 = "xla_int8"
    XLA_BF16 = "xla_bf16"
    XLA_INT8X2 = "xla_int8x2"
    PALLAS_TRITON = "pallas_triton"
    CPU_INT8 = "cpu_int8"
    CPU_INT4 = "cpu_int4"


PRIORITY = {
    # pallas_triton runs on cpu only in Pallas interpret mode (tests), last.
    "cpu": (Kernel.CPU_INT8, Kernel.CPU_INT4, Kernel.XLA_INT8, Kernel.XLA_INT8X2, Kernel.XLA_BF16,
            Kernel.DEQUANT, Kernel.PALLAS_TRITON),
    "cuda": (Kernel.PALLAS_TRITON, Kernel.XLA_INT8, Kernel.XLA_BF16, Kernel.XLA_INT8X2,
             Kernel.DEQUANT),
    "tpu": (Kernel.XLA_INT8, Kernel.XLA_BF16, Kernel.XLA_INT8X2, Kernel.DEQUANT),
}

_context = selection.KernelContext(Kernel, "quant.kernel", "kernels", "quant.Kernel")


def module(kernel_: Kernel):
    """The module implementing ``kernel_``."""
    return importlib.import_module(f"transformax.quant.kernels.{Kernel(kernel_).value}")


def kernel(kernels: Kernel | str | Iterable[Kernel | str],
           set_priority: bool = False) -> contextlib.AbstractContextManager[None]:
    """Limits int8 matmuls traced inside the block to ``kernels``; with ``set_priority=True``
    their order replaces the platform's priority."""
    return _context.limit(kernels, set_priority)


def reasons_unsupported(kernel_: Kernel, problem: Problem, platform: str) -> list[str]:
    if kernel_ not in PRIORITY[platform]:
        return [f"not a {platform} kernel"]
    return module(kernel_).reasons_unsupported(problem, platform)


@dataclasses.dataclass(frozen=True)
class Verdict(selection.Verdict):
    """One kernel on one platform: allowed by ``quant.kernel``, chosen (and why), why it cannot
    run."""

    source: str = "priority"  # why chosen: priority, host default (and why), pinned / cache / tuned
    excluded_by: ClassVar[str] = "quant.kernel"

    def chosen_note(self) -> str:
        return f" ({self.source})"


def verdicts(problem: Problem, platform: str) -> list[Verdict]:
    """Every kernel for ``platform``, in the order the selector tries them."""
    rows = [Verdict(platform, k, allowed, tuple(reasons_unsupported(k, problem, platform)))
            for k, allowed in _context.order(PRIORITY[platform])]
    eligible = [v.kernel for v in rows if v.eligible]
    if not eligible:
        return rows
    best, source = eligible[0], "priority"
    if len(eligible) > 1 and platform == current_platform() and not _context.caller_ordered:
        choice = tune.choose(problem, eligible, module)
        if choice.config.kernel in {k.value for k in eligible}:
            best, source = Kernel(choice.config.kernel), choice.source
    return [dataclasses.replace(v, chosen=True, source=source) if v.kernel == best else v
            for v in rows]


def plan(problem: Problem) -> dict[str, Kernel | None]:
    """The chosen kernel per platform (None where nothing can run)."""
    return {p: next((v.kernel for v in verdicts(problem, p) if v.chosen), None)
            for p in PLATFORMS}


def no_kernel_error(problem: Problem, platform: str) -> RuntimeError:
    return RuntimeError(f"{problem.describe()}: no kernel can run it on {platform}:\n"
                        + selection.listing(verdicts(problem, platform)))


@dataclasses.dataclass(frozen=True)
class Explanation(selection.Explanation):
    """What ``quant.explain`` returns: a verdict per platform and kernel; ``str()`` is a
    table."""

    def __str__(self) -> str:
        lines = [self.problem.describe()]
        for platform in PLATFORMS:
            lines.append(f"{platform}:")
            lines += [f"  {v.kernel.value:<14} {v.describe()}"
                      for v in self.rows if v.platform == platform]
        return "\n".join(lines)


def explanation(problem: Problem) -> Explanation:
    return Explanation(problem, tuple(v for p in PLATFORMS for v in verdicts(problem, p)))
