"""Int8 matmul kernel registry and selection: per-platform priorities, the ``kernel`` context
manager and ``explain`` (the same pattern as ``transformax.attention.select``).

Of the kernels allowed and able to run a problem, the current platform runs the one measured
fastest on this host (``quant.tune``: tuning cache, or autotuning) or, unmeasured, the first
in its static priority; other platforms (which cannot be timed here) by priority alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
from collections.abc import Iterable, Iterator

import jax

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


PRIORITY = {
    # pallas_triton runs on cpu only in Pallas interpret mode (tests), last.
    "cpu": (Kernel.CPU_INT8, Kernel.XLA_INT8, Kernel.XLA_INT8X2, Kernel.XLA_BF16, Kernel.DEQUANT,
            Kernel.PALLAS_TRITON),
    "cuda": (Kernel.PALLAS_TRITON, Kernel.XLA_INT8, Kernel.XLA_BF16, Kernel.XLA_INT8X2,
             Kernel.DEQUANT),
    "tpu": (Kernel.XLA_INT8, Kernel.XLA_BF16, Kernel.XLA_INT8X2, Kernel.DEQUANT),
}

# (allowed kernels, set_priority) or None. A JAX user context: part of jit's cache key, so a
# function jitted outside a ``kernel`` block is traced again inside one.
_allowed = jax.make_user_context(None)


def module(kernel_: Kernel):
    """The module implementing ``kernel_``."""
    return importlib.import_module(f"transformax.quant.kernels.{Kernel(kernel_).value}")


@contextlib.contextmanager
def kernel(kernels: Kernel | str | Iterable[Kernel | str],
           set_priority: bool = False) -> Iterator[None]:
    """Limits int8 matmuls traced inside the block to ``kernels``; with ``set_priority=True``
    their order replaces the platform's priority."""
    if isinstance(kernels, (Kernel, str)):
        kernels = [kernels]
    kernels = list(kernels)
    try:
        chosen = tuple(Kernel(k) for k in kernels)
    except ValueError as err:
        raise ValueError(f"quant.kernel: kernels must be quant.Kernel values, one of "
                         f"{[k.value for k in Kernel]}; got {kernels!r}") from err
    if not chosen:
        raise ValueError("quant.kernel: kernels is empty; name at least one quant.Kernel")
    with _allowed((chosen, set_priority)):
        yield


def reasons_unsupported(kernel_: Kernel, problem: Problem, platform: str) -> list[str]:
    if kernel_ not in PRIORITY[platform]:
        return [f"not a {platform} kernel"]
    return module(kernel_).reasons_unsupported(problem, platform)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One kernel on one platform: allowed by ``quant.kernel``, chosen, why it cannot run."""

    platform: str
    kernel: Kernel
    allowed: bool
    reasons: tuple[str, ...]
    chosen: bool = False
    source: str = "priority"  # why chosen: priority, host default, or pinned / cache / tuned

    def describe(self) -> str:
        if self.chosen:
            return f"chosen ({self.source})"
        if not self.allowed:
            return "excluded by quant.kernel"
        return "cannot run: " + "; ".join(self.reasons) if self.reasons else "eligible"


def verdicts(problem: Problem, platform: str) -> list[Verdict]:
    """Every kernel for ``platform``, in the order the selector tries them."""
    context = _allowed.value
    order = list(PRIORITY[platform])
    if context is not None and context[1]:
        order = list(context[0]) + [k for k in order if k not in context[0]]
    order += [k for k in Kernel if k not in order]
    rows = [Verdict(platform, k, context is None or k in context[0],
                    tuple(reasons_unsupported(k, problem, platform))) for k in order]
    eligible = [v.kernel for v in rows if v.allowed and not v.reasons]
    if not eligible:
        return rows
    best, source = eligible[0], "priority"
    ordered_by_caller = context is not None and context[1]
    if len(eligible) > 1 and platform == current_platform() and not ordered_by_caller:
        choice = tune.choose(problem, eligible, module)
        if choice.config.kernel in {k.value for k in eligible}:
            best = Kernel(choice.config.kernel)
            if choice.source != "default":
                source = choice.source
            elif best != eligible[0]:
                source = "host default"
    return [dataclasses.replace(v, chosen=True, source=source) if v.kernel == best else v
            for v in rows]


def plan(problem: Problem) -> dict[str, Kernel | None]:
    """The chosen kernel per platform (None where nothing can run)."""
    return {p: next((v.kernel for v in verdicts(problem, p) if v.chosen), None)
            for p in PLATFORMS}


def no_kernel_error(problem: Problem, platform: str) -> RuntimeError:
    lines = [f"  {v.kernel.value}: {v.describe()}" for v in verdicts(problem, platform)]
    return RuntimeError(f"{problem.describe()}: no kernel can run it on {platform}:\n"
                        + "\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What ``quant.explain`` returns: a verdict per platform and kernel; ``str()`` is a
    table."""

    problem: Problem
    rows: tuple[Verdict, ...]

    def chosen(self, platform: str) -> Kernel | None:
        return next((v.kernel for v in self.rows if v.platform == platform and v.chosen), None)

    def __str__(self) -> str:
        lines = [self.problem.describe()]
        for platform in PLATFORMS:
            lines.append(f"{platform}:")
            lines += [f"  {v.kernel.value:<14} {v.describe()}"
                      for v in self.rows if v.platform == platform]
        return "\n".join(lines)


def explanation(problem: Problem) -> Explanation:
    return Explanation(problem, tuple(v for p in PLATFORMS for v in verdicts(problem, p)))
