"""Kernel registry and selection: per-platform priorities, the ``sdpa_kernel`` context and
``explain``."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterable
from typing import ClassVar

from transformax import selection
from transformax.attention import backends, tune
from transformax.attention.problem import Problem

PLATFORMS = ("cpu", "cuda", "tpu")


class Backend(str, enum.Enum):
    """The attention kernels transformax knows."""

    MATH = "math"
    XLA_FLASH = "xla_flash"
    CPU_FLASH = "cpu_flash"
    PALLAS_TRITON = "pallas_triton"
    PALLAS_TPU = "pallas_tpu"
    CUDNN = "cudnn"


PRIORITY = {
    "cuda": (Backend.PALLAS_TRITON, Backend.CUDNN, Backend.XLA_FLASH, Backend.MATH),
    "tpu": (Backend.PALLAS_TPU, Backend.XLA_FLASH, Backend.MATH),
    # The Pallas kernels run on cpu only in interpret mode (TRANSFORMAX_PALLAS_INTERPRET=1).
    "cpu": (Backend.CPU_FLASH, Backend.XLA_FLASH, Backend.MATH, Backend.PALLAS_TRITON,
            Backend.PALLAS_TPU),
}

_context = selection.KernelContext(Backend, "sdpa_kernel", "backends", "tfx.Backend")  # per thread


def kernel(backend: Backend):
    """The module implementing ``backend`` (the ``backends.Kernel`` protocol)."""
    return backends.KERNELS[Backend(backend).value]


def sdpa_kernel(backends: Backend | Iterable[Backend],
                set_priority: bool = False) -> contextlib.AbstractContextManager[None]:
    """Limits ``sdpa`` to ``backends`` inside the block (like ``torch.nn.attention.sdpa_kernel``).

    With ``set_priority=True`` the order of ``backends`` replaces the platform's priority.
    """
    return _context.limit(backends, set_priority)


def reasons_unsupported(backend: Backend, problem: Problem, platform: str) -> list[str]:
    module = kernel(backend)
    missing = sorted(problem.features() - module.FEATURES)
    return ([f"{name}: not supported by this kernel" for name in missing]
            + module.reasons_unsupported(problem, platform))


@dataclasses.dataclass(frozen=True)
class Verdict(selection.Verdict):
    """One kernel (``backend``) on one platform: whether it is chosen (and its configuration),
    and why it cannot run."""

    config: str | None = None  # the chosen kernel's configuration and its source
    excluded_by: ClassVar[str] = "sdpa_kernel"

    @property
    def backend(self) -> Backend:
        return self.kernel

    def chosen_note(self) -> str:
        return f" [{self.config}]" if self.config else ""


def verdicts(problem: Problem, platform: str) -> list[Verdict]:
    """Every kernel for ``platform``, in the order the selector tries them."""
    rows, found = [], False
    for backend, allowed in _context.order(PRIORITY[platform]):
        if allowed and backend not in PRIORITY[platform]:
            reasons = (f"not a {platform} kernel",)
        else:
            reasons = tuple(reasons_unsupported(backend, problem, platform))
        chosen = allowed and not reasons and not found
        found |= chosen
        rows.append(Verdict(platform, backend, allowed, reasons, chosen))
    return rows


def plan(problem: Problem) -> tuple[tuple[str, str | None], ...]:
    """The chosen kernel name per platform (None where nothing can run)."""
    result = []
    for platform in PLATFORMS:
        chosen = [v.backend.value for v in verdicts(problem, platform) if v.chosen]
        result.append((platform, chosen[0] if chosen else None))
    return tuple(result)


def with_configs(problem: Problem, plan) -> Problem:
    """``problem`` carrying the configuration each planned kernel that has one will run with
    (pinned, cached, tuned or the host default: ``transformax.tuning``)."""
    configs = []
    for _, name in plan:
        module = None if name is None else kernel(Backend(name))
        if hasattr(module, "candidates"):
            configs += [((name, pass_), tune.choose(module, problem, pass_).config)
                        for pass_ in tune.PASSES]
    return dataclasses.replace(problem, kernel_configs=tuple(dict.fromkeys(configs)))


def config_description(backend: Backend, problem: Problem) -> str | None:
    """Which configuration ``backend`` would run ``problem`` with, and where it comes from."""
    module = kernel(backend)
    if not hasattr(module, "candidates"):
        return None
    return "; ".join(f"{pass_} {tune.choose(module, problem, pass_).describe()}"
                     for pass_ in tune.PASSES)


def exportable(problem: Problem, platform: str, name: str) -> str:
    """``name``, or where its kernel cannot be serialized by ``jax.export`` (a custom call with
    no compatibility guarantee) the first eligible kernel that can."""
    if getattr(kernel(Backend(name)), "EXPORTABLE", True):
        return name
    for verdict in verdicts(problem, platform):
        if verdict.eligible and getattr(kernel(verdict.backend), "EXPORTABLE", True):
            return verdict.backend.value
    raise no_kernel_error(problem, platform)


def no_kernel_error(problem: Problem, platform: str) -> RuntimeError:
    return RuntimeError(f"sdpa: no attention kernel can run these inputs on {platform}:\n"
                        + selection.listing(verdicts(problem, platform)))


@dataclasses.dataclass(frozen=True)
class Explanation(selection.Explanation):
    """What ``explain`` returns: a verdict per platform and kernel; ``str()`` prints a table."""

    def __str__(self) -> str:
        p = self.problem
        lines = [f"sdpa problem: B={p.batch} Hq={p.q_heads} Hk={p.kv_heads} L={p.q_len} "
                 f"S={p.kv_len} E={p.head_dim} Ev={p.v_head_dim} dtype={p.dtype} "
                 f"causal_offset={p.causal_offset} mask={p.mask_dtype}{p.mask_shape or ''} "
                 f"dropout_p={p.dropout_p} needs={sorted(p.features()) or 'nothing more'}"]
        forward, both = p.flops()
        lines.append(f"cost: {forward / 1e9:.4g} GFLOP forward, {both / 1e9:.4g} GFLOP forward + "
                     f"backward")
        for platform in PLATFORMS:
            chosen = self.chosen(platform)
            estimate = getattr(kernel(chosen), "temporary_bytes", None) if chosen else None
            memory = f" (temporaries ~{_bytes(estimate(p))})" if estimate else ""
            lines.append(f"{platform}:{memory}")
            lines += [f"  {v.backend.value:<18} {v.describe()}"
                      for v in self.rows if v.platform == platform]
        return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def explanation(problem: Problem) -> Explanation:
    """Every verdict, the chosen ones with their configuration (read here only: ``verdicts``
    also runs on every ``sdpa`` trace, which needs no config descriptions)."""
    rows = [dataclasses.replace(v, config=config_description(v.backend, problem)) if v.chosen
            else v for p in PLATFORMS for v in verdicts(problem, p)]
    return Explanation(problem, tuple(rows))
