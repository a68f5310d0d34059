"""What the Pallas kernels share: interpret mode, per-platform dispatch, the GPU generation, the
operands they read, and which blocks each block visits (``blocks.classify`` as lists).

Interpret mode: with ``TRANSFORMAX_PALLAS_INTERPRET=1`` the Pallas kernels also run on cpu, in
Pallas interpret mode (slow; for tests and debugging), and become eligible there, after the
cpu kernels: select them with ``tfx.sdpa_kernel``. cuda/tpu lowerings are unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transformax.attention import blocks, tile_hooks, tile_math
from transformax.attention.backends import xla_flash
from transformax.attention.problem import Extras, Problem

INTERPRET_ENV = "TRANSFORMAX_PALLAS_INTERPRET"
NT = (((1,), (1,)), ((), ()))  # dot_general dimension numbers of a @ b.T


def interpret_enabled() -> bool:
    """True when ``TRANSFORMAX_PALLAS_INTERPRET=1``."""
    return os.environ.get(INTERPRET_ENV, "") == "1"


def cpu_reasons(platform: str) -> list[str]:
    """The reason a Pallas kernel cannot run on cpu, if any."""
    if platform == "cpu" and not interpret_enabled():
        return [f"runs on cpu only in Pallas interpret mode ({INTERPRET_ENV}=1)"]
    return []


def per_platform(build, *args, interpret=None):
    """``build(interpret=False)(*args)`` on the accelerator and, in interpret mode, the same
    kernel interpreted, ``build(interpret=True)``, on cpu. The choice is made when lowering, so
    a function traced once lowers to the compiled kernel for cuda/tpu and to the interpreter
    for cpu, also in one multi-platform export. A given ``interpret`` (e.g. TPU
    ``InterpretParams``) is used everywhere instead."""
    if interpret is not None:
        return build(interpret=interpret)(*args)
    compiled = build(interpret=False)
    if not interpret_enabled():
        return compiled(*args)
    return lax.platform_dependent(*args, cpu=build(interpret=True), default=compiled)


def indexing_reasons(problem: Problem, platform: str, vector_loads: bool = True) -> list[str]:
    """Why a compiled kernel cannot run the mask_mod/score_mod on tiles (``tile_hooks``):
    what it does with its captured arrays has no load form, or (without ``vector_loads``) it
    reads them at per-element positions (``table[q_idx - kv_idx]``, not ``slopes[h]``) or an
    array both whole and one element at a time. Interpret mode (cpu) runs everything."""
    if platform == "cpu":
        return []
    reasons = []
    for name, fn in (("mask_mod", problem.mask_fn), ("score_mod", problem.score_fn)):
        if fn is None:
            continue
        try:
            loads = tile_hooks.check(fn)
        except tile_hooks.Unsupported as err:
            reasons.append(f"its {name} cannot run on tiles here: {err}")
            continue
        if vector_loads:
            continue
        if any(shape for const in loads for shape in const if shape):
            reasons.append(f"its {name} reads a captured array at per-element positions (a "
                           f"vector gather), which the Pallas {platform} lowering does not "
                           f"support")
        elif any(None in const and () in const for const in loads):
            reasons.append(f"its {name} reads a captured array both whole and one element at "
                           f"a time")
    return reasons


@functools.lru_cache(maxsize=None)
def cuda_capability() -> tuple[int, int] | None:
    """The compute capability of the first visible CUDA GPU, or None where there is none."""
    try:
        device = jax.devices("cuda")[0]
    except RuntimeError:
        return None
    major, minor = str(device.compute_capability).split(".")[:2]
    return int(major), int(minor)


def kernel_operands(problem: Problem, extras: Extras) -> list:
    """The ``extras`` a Pallas kernel reads, flat (``split_refs`` order): a bool mask as int8;
    not the block table (it only drives ``visits``)."""
    mask = extras.mask
    if mask is not None and problem.mask_is_bool:
        mask = mask.astype(jnp.int8)
    return extras._replace(mask=mask, table=None).flat()


def split_refs(problem: Problem, refs):
    """Kernel refs (q, k, v, ``kernel_operands``, the rest) -> ``(q, k, v, extras, rest)`` with
    ``extras`` an ``Extras`` of refs."""
    q_ref, k_ref, v_ref, *rest = refs
    extras, rest = Extras.unflat(dataclasses.replace(problem, table_blocks=None), rest)
    return q_ref, k_ref, v_ref, extras, rest


@dataclasses.dataclass(frozen=True)
class Visits:
    """Which blocks of the other kind each block visits (key blocks per query block, or with
    ``transpose`` query blocks per key block), per batch and query head of the classification
    (``batches``, ``heads``: 1 where it is the same for all): ``n_full`` FULL ones (no masking
    work) first, then PARTIAL ones (masked) up to ``n_visible``; EMPTY ones never. Three flat
    int32 operands (scalar-prefetch friendly), ``width`` order entries per block."""

    batches: int
    heads: int
    n_blocks: int
    width: int

    def row(self, b, h, n):
        """The flat row of block ``n`` of (batch ``b``, query head ``h``)."""
        b = b if self.batches > 1 else 0
        h = h if self.heads > 1 else 0
        return (b * self.heads + h) * self.n_blocks + n

    def read(self, refs, b, h, n):
        """``(n_full, n_visible, row)`` of block ``n``; its i-th visit is
        ``order[row * width + i]``."""
        n_full, n_visible, _ = refs
        row = self.row(b, h, n)
        return n_full[row], n_visible[row], row


def visits(problem: Problem, extras: Extras, block_q: int, block_k: int,
           transpose: bool = False) -> tuple[Visits, tuple]:
    """``blocks.classify`` as visit lists: ``(Visits, (n_full, n_visible, order))``, in NumPy
    where the classes are static (XLA would constant-fold the sort, for seconds at long S)."""
    classes = blocks.classify(problem, extras, block_q, block_k)
    xp = np if isinstance(classes, np.ndarray) else jnp
    if transpose:
        classes = xp.swapaxes(classes, 2, 3)
    rank = xp.where(classes == blocks.FULL, 0, xp.where(classes == blocks.PARTIAL, 1, 2))
    order = xp.argsort(rank, axis=-1, stable=True).astype(np.int32)
    n_full = xp.sum(classes == blocks.FULL, axis=-1, dtype=np.int32)
    n_visible = xp.sum(classes != blocks.EMPTY, axis=-1, dtype=np.int32)
    return Visits(*classes.shape), (n_full.reshape(-1), n_visible.reshape(-1), order.reshape(-1))


def score_consts_gradients(problem: Problem, q, k, v, extras: Extras, out, lse, dout,
                           dlse) -> tuple:
    """The gradients of the score_mod's floating captured arrays, from a separate blockwise
    plain-JAX pass (``xla_flash.backward``; XLA drops its unused dq/dk/dv products): indexing
    the arrays transposes to scatter-adds, which Mosaic cannot lower and Triton only as one
    atomic add per element (a relative-bias table: every tile's elements contending for a few
    entries)."""
    if not tile_math.differentiable_consts(problem, extras):
        return ()
    return xla_flash.backward(problem, q, k, v, extras, out, lse, dout, dlse)[3]
