"""Native flash attention for x86 CPUs: C++ (``csrc/``) behind XLA's FFI, one build with AVX2+FMA
and AVX-512 code paths picked at run time, forward and backward.

Per tile it fuses what XLA runs as separate passes: the scores GEMM with a register-blocked
micro-kernel, masking only on tiles that need it, a vectorised exp with the running max and sum,
and the P·V GEMM, all in the worker's cache. Structured masks (a causal offset, per-row key
intervals, segment ids) are classified per tile in C++ from each query block's union and
intersection of row intervals and each block's range of ids: hidden tiles are never visited
(the forward also enters a key tile only at the first column its query block sees), fully
visible ones skip the masking work.
The forward parallelises over (batch, head, query block), the backward over (batch, key/value
head, key chunk): with fewer (batch, key/value head) pairs than twice the threads, each pair's
key blocks are dealt round-robin to chunks whose dQ partial sums are added up at the end.
Everything runs in float32 (bf16/f16 operands are widened first). Tiles and threads come from
``transformax.tuning``: pinned, cached, tuned or derived from the host's cache sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformax import host, native
from transformax.attention import blocks, tune
from transformax.attention.problem import Extras, Problem
from transformax.attention.tile_math import finite_or_zero, row_delta

EXTENSION = native.load("_flash_cpu", {"tfx_cpu_flash_fwd": "forward",
                                       "tfx_cpu_flash_bwd": "backward"})

NAME = "cpu_flash"
FEATURES = frozenset({"dense mask", "dropout", "key intervals", "segment ids", "mask_mod"})
MASK_MOD_LIMIT = 2**26  # elements of the dense mask a generic mask_mod is evaluated into
# Its FFI targets carry no serialization guarantee: jax.export lowers the next eligible kernel.
EXPORTABLE = False
_ISA_CODES = {"avx2": 0, "avx512": 1}
_LANES = {"avx2": 8, "avx512": 16}  # floats per vector (VW in csrc/flash_attention.cc)
_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of one pass: ``block_q`` query rows (<= 512) by ``block_k`` keys, run on
    ``threads`` threads with the ``isa`` code path ('avx2' or 'avx512')."""

    block_q: int
    block_k: int
    threads: int
    isa: str

    def __post_init__(self):
        if not 1 <= self.block_q <= 512 or not 1 <= self.block_k <= 4096:
            raise ValueError(f"cpu_flash Config: block_q must be in [1, 512] and block_k in "
                             f"[1, 4096]; got block_q={self.block_q}, block_k={self.block_k}")
        if self.threads < 1:
            raise ValueError(f"cpu_flash Config: threads must be >= 1; got {self.threads}")
        if self.isa not in _ISA_CODES:
            raise ValueError(f"cpu_flash Config: isa must be one of {sorted(_ISA_CODES)}; "
                             f"got {self.isa!r}")


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    reasons = EXTENSION.reasons_unsupported(_ISA_CODES)
    if problem.dtype not in _DTYPES:
        reasons.append(f"dtype {problem.dtype}: computes in float32 (float32/bfloat16/float16 "
                       f"inputs only)")
    if problem.mask_fn is not None and blocks.materialise(problem, None, MASK_MOD_LIMIT,
                                                          check_only=True) is None:
        reasons.append(f"a mask_mod is evaluated into a dense mask here, and this one would "
                       f"exceed {MASK_MOD_LIMIT} elements")
    return reasons


def working_set(problem: Problem, pass_: str, block_q: int, block_k: int) -> int:
    """Bytes one worker keeps hot per tile: the forward's query/output rows, scores and one
    key/value tile; the backward's scores and dP, query/dO rows, and K, K^T, V^T, dK, dV."""
    e, ev = problem.head_dim, problem.v_head_dim
    if pass_ == "fwd":
        floats = block_q * block_k + block_q * (e + ev) + block_k * (e + ev)
    else:
        floats = 2 * block_q * block_k + block_q * (e + ev) + block_k * (3 * e + 2 * ev)
    return 4 * floats


def backward_chunks(problem: Problem, cfg: Config) -> int:
    """Key chunks per (batch, key/value head) in the backward (as csrc/flash_attention.cc picks
    them): enough work items for two per thread."""
    heads = problem.batch * problem.kv_heads
    return max(1, min(-(-problem.kv_len // cfg.block_k), -(-2 * cfg.threads // heads)))


def temporary_bytes(problem: Problem) -> int:
    """The packed key tiles (and value tiles, where V's rows are not whole vectors and cannot be
    read in place), each thread's tiles (the backward's, the larger) and the backward's dQ
    partial sums (one copy of dQ per key chunk)."""
    p, cfg = problem, tune.planned(NAME, problem, "bwd")
    lanes = _LANES[tune.planned(NAME, problem, "fwd").isa]  # the forward packs the tiles
    packed_v = 0 if p.v_head_dim % lanes == 0 else p.v_head_dim
    packed = 4 * p.batch * p.kv_heads * p.kv_len * (p.head_dim + packed_v)
    dq = 4 * backward_chunks(p, cfg) * p.batch * p.q_heads * p.q_len * p.head_dim
    return packed + cfg.threads * working_set(p, "bwd", cfg.block_q, cfg.block_k) + dq


def default_config(problem: Problem, pass_: str) -> Config:
    """Tiles measured best on a 2-core AVX-512 host (2 MiB of L2 per core), shrunk to fit 3/4 of
    the host's per-core L2 (so a 512 KiB L2 gets 256-key tiles). Forward: 256 x 512 without a
    causal mask; with one, 128 x 256 (64 rows up to 1024 queries), since diagonal tiles are
    partly wasted; with key intervals (bands: windows, documents, caches) 64 x 256 at every
    length (a 512-key window over 4096 queries: 0.88x the time of 128 x 256). Backward: 128 x 128."""
    h = host.current()
    banded = problem.bounds is not None or problem.mask_fn is not None  # intervals after all
    causal = problem.causal_offset is not None or banded
    if pass_ == "bwd":
        block_q, widest = 128, 128
    elif causal:
        block_q, widest = (64 if problem.q_len <= 1024 or banded else 128), 256
    else:
        block_q, widest = (256 if h.l2 >= 2**20 else 128), 512
    block_q = min(block_q, max(problem.q_len, 1))
    fitting = [bk for bk in (512, 256, 128, 64)
               if bk <= widest and working_set(problem, pass_, block_q, bk) <= 0.75 * h.l2]
    block_k = min(fitting[0] if fitting else 64, max(8, -(-problem.kv_len // 8) * 8))
    return Config(block_q=block_q, block_k=block_k, threads=h.cores,
                  isa=h.isa if h.isa in _ISA_CODES else "avx2")


def candidates(problem: Problem, pass_: str) -> list[Config]:
    base = default_config(problem, pass_)
    tiles = {(base.block_q, base.block_k)}
    for block_q in (32, 64, 128, 256):
        for block_k in (128, 256, 512):
            if block_q <= max(problem.q_len, 16) and block_k <= max(problem.kv_len, 128):
                tiles.add((block_q, block_k))
    return [dataclasses.replace(base, block_q=bq, block_k=bk) for bq, bk in sorted(tiles)]


def _attributes(problem: Problem, cfg: Config) -> dict:
    p = problem
    mask_kind = 0 if not p.has_mask else 1 if p.mask_is_bool else 2
    threshold = min(round(p.dropout_p * 2.0**32), 2**32 - 1) if p.has_dropout else 0
    return dict(mask_kind=np.int64(mask_kind), causal=np.int64(p.causal_offset is not None),
                causal_offset=np.int64(p.causal_offset or 0),
                bounds=np.int64(p.bounds is not None), segments=np.int64(p.segments is not None),
                scale=np.float32(p.scale), dropout_threshold=np.int64(threshold),
                inv_keep=np.float32(1.0 / (1.0 - p.dropout_p)), block_q=np.int64(cfg.block_q),
                block_k=np.int64(cfg.block_k), isa=np.int64(_ISA_CODES[cfg.isa]),
                threads=np.int64(cfg.threads))


def _operands(problem: Problem, q, k, v, extras: Extras):
    """f32 q/k/v, a bool or f32 mask, a uint32[2] seed, the int32 key intervals and segment
    ids (a dummy for each that is absent)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    mask, seed = extras.mask, extras.seed
    if mask is None:
        mask = jnp.zeros((1, 1, 1, 1), jnp.float32)
    elif not problem.mask_is_bool:
        mask = mask.astype(jnp.float32)
    if seed is None:
        seed = jnp.zeros((2,), jnp.uint32)
    dummy = jnp.zeros((1, 1), jnp.int32)
    structure = [x.astype(jnp.int32) for x in (*extras.bounds, *extras.segments)]
    bounds = structure[:2] if extras.bounds else [dummy, dummy]
    segments = structure[-2:] if extras.segments else [dummy, dummy]
    return (*f32, mask, seed, *bounds, *segments)


def _forward_call(problem: Problem, cfg: Config, q, k, v, extras: Extras):
    p = problem
    shapes = (jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len, p.v_head_dim), jnp.float32),
              jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len), jnp.float32))
    return jax.ffi.ffi_call("tfx_cpu_flash_fwd", shapes)(
        *_operands(p, q, k, v, extras), **_attributes(p, cfg))


def _backward_call(problem: Problem, cfg: Config, q, k, v, extras: Extras, lse, delta, dout):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    return jax.ffi.ffi_call("tfx_cpu_flash_bwd", shapes)(
        *_operands(problem, q, k, v, extras), lse.astype(jnp.float32),
        delta.astype(jnp.float32), dout.astype(jnp.float32), **_attributes(problem, cfg))


def _run(call, problem: Problem, extras: Extras):
    """``call(problem, extras)``; a generic mask_mod becomes its rows' hull intervals, plus the
    dense mask where the hull is not exact (``blocks.materialise``): the native code skips the
    hidden tiles and masks per element only where needed."""
    if problem.mask_fn is None:
        return call(problem, extras)
    exact, hull, convex = blocks.materialise(problem, extras, MASK_MOD_LIMIT)
    if isinstance(convex, bool):  # known when traced
        return call(*(hull if convex else exact))
    return jax.lax.cond(convex, lambda: call(*hull), lambda: call(*exact))


def forward(problem: Problem, q, k, v, extras: Extras):
    cfg = tune.planned(NAME, problem, "fwd")
    out, lse = _run(lambda p, e: _forward_call(p, cfg, q, k, v, e), problem, extras)
    return out.astype(q.dtype), lse


def backward(problem: Problem, q, k, v, extras: Extras, out, lse, dout, dlse):
    delta = row_delta(out, dout, dlse)
    cfg = tune.planned(NAME, problem, "bwd")
    dq, dk, dv = _run(lambda p, e: _backward_call(p, cfg, q, k, v, e, finite_or_zero(lse), delta,
                                                  dout), problem, extras)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), ()
