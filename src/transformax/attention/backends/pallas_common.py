"""What the Pallas kernels share: interpret mode, per-platform dispatch, the GPU generation, and
which key/query blocks a causal mask shows partly or completely.

Interpret mode: with ``TRANSFORMAX_PALLAS_INTERPRET=1`` the Pallas kernels also run on cpu, in
Pallas interpret mode (slow; for tests and debugging), and become eligible there, after the
cpu kernels: select them with ``tfx.sdpa_kernel``. cuda/tpu lowerings are unaffected.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from transformax.attention.problem import Problem, cdiv

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


@functools.lru_cache(maxsize=None)
def cuda_capability() -> tuple[int, int] | None:
    """The compute capability of the first visible CUDA GPU, or None where there is none."""
    try:
        device = jax.devices("cuda")[0]
    except RuntimeError:
        return None
    major, minor = str(device.compute_capability).split(".")[:2]
    return int(major), int(minor)


def split_refs(problem: Problem, refs):
    """Kernel refs -> ``(q, k, v, mask, seed, rest)``; mask and seed are None where unused."""
    q_ref, k_ref, v_ref, *rest = refs
    mask_ref = rest.pop(0) if problem.has_mask else None
    seed_ref = rest.pop(0) if problem.has_dropout else None
    return q_ref, k_ref, v_ref, mask_ref, seed_ref, rest


def _floor_div(x, d: int):
    """``floor(x / d)`` for ``x >= 0``, and 0 for ``x < 0`` (truncating division only: ``//``
    lowers through ``sign``, which Mosaic cannot lower without a TPU attached)."""
    return lax.div(jnp.maximum(x, 0), jnp.int32(d))


def key_blocks(problem: Problem, i, block_q: int, block_k: int):
    """For query block ``i``: ``(n_full, n_visible)``. Key blocks ``[0, n_full)`` need no causal
    or bounds masking, ``[n_full, n_visible)`` need it, the rest are hidden. ``i`` may be traced;
    without a causal mask the result is static."""
    nk = cdiv(problem.kv_len, block_k)
    whole = problem.kv_len // block_k  # the ragged last block needs bounds masking
    offset = problem.causal_offset
    if offset is None:
        return whole, nk
    if whole == 0:  # one ragged block: nothing is complete (and nothing to trace for it)
        return 0, 1
    last = jnp.minimum((i + 1) * block_q, problem.q_len) - 1 + offset
    visible = jnp.minimum(jnp.where(last >= 0, _floor_div(last, block_k) + 1, 0), nk)
    full = jnp.minimum(jnp.minimum(_floor_div(i * block_q + offset + 1, block_k), whole), visible)
    return full, visible


def query_blocks(problem: Problem, j, block_q: int, block_k: int):
    """For key block ``j``: ``(first, first_full)``. Query blocks ``[first, first_full)`` see it
    partly (causal or bounds masking), ``[first_full, nq)`` see it completely, earlier ones not
    at all. ``j`` may be traced."""
    nq = cdiv(problem.q_len, block_q)
    ragged = problem.kv_len % block_k != 0
    offset = problem.causal_offset
    if offset is None:
        first, first_full = 0, 0
    else:
        first = jnp.minimum(_floor_div(j * block_k - offset, block_q), nq)
        first_full = jnp.clip(_floor_div((j + 1) * block_k - 1 - offset + block_q - 1, block_q),
                              first, nq)
    if ragged:  # the ragged last key block needs bounds masking in every query block
        last = j == cdiv(problem.kv_len, block_k) - 1
        first_full = lax.select(last, jnp.int32(nq), jnp.asarray(first_full, jnp.int32))
    return first, first_full
