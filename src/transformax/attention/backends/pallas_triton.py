"""Flash attention as Pallas kernels with the Triton lowering (NVIDIA GPUs, sm80+).

Forward: one program per (query block, batch, query head) runs the online softmax over the key
blocks ``blocks.classify`` leaves visible (``pallas_common.visits`` lists, an int32 operand, per
batch and head where the mask depends on them) with f32 statistics and base-2 exponentials:
first the FULL ones (no masking work), then the PARTIAL ones, masked; EMPTY ones are never
read. The backward pass is two kernels that recompute the probabilities from the saved
log-sum-exp: one per key block and key/value head (dk, dv, looping over the query heads of its
GQA group and the query blocks that see it), one per query block (dq).

Scores, masks (causal offset, key intervals, segment ids, mask_mod, dense), score_mod and
dropout are ``tile_math``'s, in natural-log units, converted to base 2 after the mask. The
structured mask's per-row and per-key values are loaded per tile. The mask_mod/score_mod
captured arrays are whole-array operands that the hooks read at the tile's positions
(``tile_hooks``: ``table[q_idx - kv_idx]`` becomes a vector load, ``slopes[h]`` a scalar one).
The score_mod's captured arrays get their gradients from a separate plain-JAX pass
(``pallas_common.score_consts_gradients``).

Nothing is padded or repeated in memory: head dims are padded to a power of two and ragged
sequence ends handled by masked loads and stores. A bool mask is read as int8.

Precision: f32 inputs multiply in full IEEE f32, like torch's default
(``torch.backends.cuda.matmul.allow_tf32 = False``). TF32 is faster on Ampere and newer and
loses precision; opt in with ``with jax.default_matmul_precision("tensorfloat32"):`` around
the traced call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from transformax.attention.backends import pallas_common as pc
from transformax.attention import tile_math
from transformax.attention.problem import Extras, Problem, cdiv
from transformax.attention.tile_math import Index, dropout_keep, finite_or_zero, row_delta

# The Triton lowering is used on purpose (the portable sm80+ kernel, and the one interpret mode
# checks); JAX 0.11 deprecates it in favour of Mosaic GPU and would warn at every lowering.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_HEAD_DIM = 256
_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))
_TN = (((0,), (0,)), ((), ()))  # dot_general dimension numbers of a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b

NAME = "pallas_triton"
FEATURES = frozenset({"dense mask", "dropout", "key intervals", "segment ids", "mask_mod",
                      "score_mod"})


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes (powers of two, >= 16) and Triton launch parameters."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dkv: int = 32  # the dk/dv kernel: one key block, looping over query blocks
    block_k_dkv: int = 128
    block_q_dq: int = 128  # the dq kernel: one query block, looping over key blocks
    block_k_dq: int = 32
    bwd_warps: int = 8
    bwd_stages: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("block_"):
                if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
                    raise ValueError(f"pallas_triton.Config: {field.name}={value!r} must be a "
                                     f"power of two >= 16 (Triton tiles)")
            elif not (isinstance(value, int) and value >= 1):
                raise ValueError(f"pallas_triton.Config: {field.name}={value!r} must be a "
                                 f"positive int")
        for name in ("num_warps", "bwd_warps"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"pallas_triton.Config: {name}={value} must be a power of two")


def _dot(a, b, dims=_NN):
    """``a @ b`` (by ``dims``) accumulated in f32. f32 inputs multiply in full f32 (IEEE, as
    torch does by default), not TF32, unless ``jax.default_matmul_precision`` is set: opt in to
    TF32 with ``jax.default_matmul_precision("tensorfloat32")`` around the call."""
    precision = None
    if a.dtype == jnp.float32 and jax.config.jax_default_matmul_precision is None:
        precision = lax.Precision.HIGHEST
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


HOPPER_SMEM = 232_448  # bytes of shared memory one H100 thread block may use (227 KiB)
WGMMA_ROWS = 64  # Hopper's warpgroup MMA tile height


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def backward_smem(problem: Problem, cfg: Config) -> int:
    """Estimated shared memory (bytes) of the larger backward kernel, where Triton stages dot
    operands: the tiles a program keeps (k, v in dk/dv; q, dout in dq), ``bwd_stages`` copies
    of those it streams, and its two (bq, bk) probability / ds tiles."""
    width = (_pow2(problem.head_dim) + _pow2(problem.v_head_dim)) * problem.dtype.itemsize

    def kernel(kept: int, streamed: int, bq: int, bk: int) -> int:
        return (kept + cfg.bwd_stages * streamed) * width + 2 * bq * bk * problem.dtype.itemsize

    return max(kernel(cfg.block_k_dkv, cfg.block_q_dkv, cfg.block_q_dkv, cfg.block_k_dkv),
               kernel(cfg.block_q_dq, cfg.block_k_dq, cfg.block_q_dq, cfg.block_k_dq))


def _tf32(problem: Problem) -> bool:
    """f32 inputs whose dots run in TF32 (opted in: ``_dot``), so on tensor cores."""
    return (problem.dtype == np.float32
            and jax.config.jax_default_matmul_precision not in (None, "highest", "float32"))


def _hopper_backward(problem: Problem, cfg: Config) -> Config:
    """``cfg`` with backward tiles of at least 64 rows (wgmma's M: query rows of dq and of the
    dk/dv scores, key rows of the dk/dv products), 8 warps, and fewer pipeline stages where
    needed to fit an H100's shared memory; ``cfg`` as is where even one stage does not fit."""
    rows = {name: max(getattr(cfg, name), WGMMA_ROWS)
            for name in ("block_q_dkv", "block_k_dkv", "block_q_dq")}
    if all(getattr(cfg, name) == value for name, value in rows.items()):
        return cfg
    for stages in range(cfg.bwd_stages, 0, -1):
        wide = dataclasses.replace(cfg, **rows, bwd_warps=max(cfg.bwd_warps, 8),
                                   bwd_stages=stages)
        if backward_smem(problem, wide) <= HOPPER_SMEM:
            return wide
    return cfg


def default_config(problem: Problem, capability: tuple[int, int] | None = None) -> Config:
    """Tiles for A100/H100 shared memory by the bytes of one (padded) head row, shrunk to the
    sequence lengths. On ``capability`` (default: the local GPU's) >= sm90, f32 inputs in TF32
    get backward tiles of at least 64 rows, Hopper's wgmma tile height, where they fit its
    shared memory (``_hopper_backward``: head dims up to 128). Measured on an H100 (backward,
    B4 H16 L4096): TF32 E=128 6.7x and E=64 1.5x faster than 32-row tiles; IEEE f32 (no tensor
    cores) 1.9-2.7x slower and bf16 E=128/256 4-9% slower with them, so those keep 32 rows."""
    capability = capability or pc.cuda_capability()
    row_bytes = _pow2(max(problem.head_dim, problem.v_head_dim)) * problem.dtype.itemsize
    if row_bytes <= 128:  # head dim <= 64 in 16-bit
        cfg = Config(num_warps=4, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                     bwd_warps=4)
    elif row_bytes <= 256:  # head dim 128 in 16-bit
        cfg = Config()
    else:  # head dim 256 in 16-bit, or f32 beyond 64
        small = 32 if row_bytes <= 512 else 16
        cfg = Config(block_q=2 * small, block_k=small, num_warps=4, num_stages=2,
                     block_q_dkv=small, block_k_dkv=small, block_q_dq=small, block_k_dq=small,
                     bwd_warps=4)
    if capability and capability >= (9, 0) and _tf32(problem):
        cfg = _hopper_backward(problem, cfg)
    lq, lk = _pow2(problem.q_len), _pow2(problem.kv_len)
    return dataclasses.replace(
        cfg, block_q=min(cfg.block_q, lq), block_k=min(cfg.block_k, lk),
        block_q_dkv=min(cfg.block_q_dkv, lq), block_k_dkv=min(cfg.block_k_dkv, lk),
        block_q_dq=min(cfg.block_q_dq, lq), block_k_dq=min(cfg.block_k_dq, lk))


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    reasons = pc.cpu_reasons(platform) + pc.indexing_reasons(problem, platform)
    if problem.dtype not in _DTYPES:
        reasons.append(f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)")
    for name, dim in (("E", problem.head_dim), ("Ev", problem.v_head_dim)):
        if dim > MAX_HEAD_DIM:
            reasons.append(f"head dim {name}={dim} is larger than {MAX_HEAD_DIM}")
    capability = pc.cuda_capability() if platform == "cuda" else None
    if capability is not None and capability < (8, 0):
        reasons.append(f"needs an sm80+ GPU (found sm{capability[0]}{capability[1]})")
    elif capability is not None and (error := lowering_error()):
        reasons.append(error)
    return reasons


def _probe_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


@functools.lru_cache(maxsize=None)
def lowering_error() -> str | None:
    """Why jax's Triton lowering fails on the local GPU (it raises, for example, on GPU models
    missing from jax's table of GPU properties), or None where a small kernel lowers."""
    shape = jax.ShapeDtypeStruct((16,), jnp.float32)
    kernel = pl.pallas_call(_probe_kernel, out_shape=shape,
                            compiler_params=_compiler_params(warps=1, stages=1))
    try:
        jax.jit(kernel).trace(shape).lower(lowering_platforms=("cuda",))
    except Exception as err:  # noqa: BLE001 - any failure means: do not pick this kernel
        return f"jax's Pallas Triton lowering fails on this GPU: {err}".splitlines()[0]
    return None


def _bounds(start, size: int, length: int, width: int, padded: int, check_rows: bool):
    """The load/store mask of a ``(size, padded)`` tile at row ``start``: rows below ``length``
    (when ``check_rows``) and columns below ``width``; None where everything is in bounds."""
    mask = None
    if check_rows:
        mask = (start + jnp.arange(size) < length)[:, None]
    if width < padded:
        cols = (jnp.arange(padded) < width)[None, :]
        mask = cols if mask is None else mask & cols
    return mask


def _load(ref, lead: tuple, start, size: int, length: int, width: int, check_rows: bool):
    """Rows ``[start, start + size)`` of the 2-D slab ``ref[lead]``, all its (padded) columns;
    zeros beyond ``length`` rows and ``width`` columns."""
    padded = ref.shape[-1]
    index = (*lead, pl.ds(start, size), pl.ds(0, padded))
    mask = _bounds(start, size, length, width, padded, check_rows)
    if mask is None:
        return ref[index]
    return plgpu.load(ref.at[index], mask=mask, other=0)


def _store(ref, value, start, length: int, width: int, check_rows: bool):
    """Stores a ``(size, padded)`` tile at rows ``[start, start + size)`` of the 2-D ``ref``,
    within ``length`` rows and ``width`` columns."""
    size, padded = value.shape
    index = (pl.ds(start, size), pl.ds(0, padded))
    mask = _bounds(start, size, length, width, padded, check_rows)
    if mask is None:
        ref[index] = value.astype(ref.dtype)
    else:
        plgpu.store(ref.at[index], value.astype(ref.dtype), mask=mask)


def _load_rows(ref, lead: tuple, start, size: int, length: int, check_rows: bool):
    """Per-row statistics ``ref[lead][start:start + size]``, zeros at and beyond ``length``."""
    index = (*lead, pl.ds(start, size))
    if not check_rows:
        return ref[index]
    return plgpu.load(ref.at[index], mask=start + jnp.arange(size) < length, other=0)


def _store_rows(ref, value, start, length: int, check_rows: bool):
    """Stores per-row statistics at ``[start, start + size)``, below ``length``."""
    index = pl.ds(start, value.shape[0])
    if check_rows:
        plgpu.store(ref.at[index], value, mask=start + jnp.arange(value.shape[0]) < length)
    else:
        ref[index] = value


class _Scores:
    """The tiles of one (batch, query head): scores through ``tile_math`` and dropout, shared by
    the three kernels."""

    def __init__(self, problem: Problem, extras: Extras, b, h, mask_head=0):
        self.p, self.extras, self.b, self.h = problem, extras, b, h
        self.mask_head = jnp.int32(mask_head) if isinstance(mask_head, int) else mask_head
        self.seed = None if extras.seed is None else tuple(
            extras.seed[i] for i in range(extras.seed.shape[0]))
        # The hooks' captured arrays stay refs: indexing them becomes loads at the tile's
        # positions (``tile_hooks``).
        self.consts = Extras(score_consts=extras.score_consts)

    def raw(self, q, k):
        """``scale * q k^T`` in f32: natural-log units, what score_mod sees."""
        return _dot(q, k, pc.NT) * jnp.float32(self.p.scale)

    def index(self, row0, col0, size_q: int, size_k: int) -> Index:
        rows, cols = _coords(row0, col0, size_q, size_k)
        return Index(self.b, self.h, rows, cols)

    def __call__(self, raw, row0, col0, masked: bool):
        """Base-2 scores (``log2(e)`` times those the softmax sees) of the tile at
        ``(row0, col0)``: score_mod, and for ``masked`` (PARTIAL) tiles every mask."""
        p = self.p
        size_q, size_k = raw.shape
        idx = self.index(row0, col0, size_q, size_k)
        if not masked:
            return tile_math.score_mod(p, self.consts, raw, idx) * jnp.float32(LOG2E)
        s = tile_math.scores(p, self._tile_extras(row0, col0, size_q, size_k), raw, idx,
                             self._mask_tile(row0, col0, idx), gathered=True)
        if p.kv_len % size_k:
            s = jnp.where(idx.kv < p.kv_len, s, -jnp.inf)
        return s * jnp.float32(LOG2E)

    def vjp(self, raw, row0, col0, ds):
        """The gradient of the raw scores from that of the modified ones."""
        idx = self.index(row0, col0, *raw.shape)
        return tile_math.score_mod_vjp(self.p, self.consts, raw, idx, ds)[0]

    def _tile_extras(self, row0, col0, size_q: int, size_k: int) -> Extras:
        """The structured mask's operands of the tile: per-row and per-column values."""
        p, e = self.p, self.extras

        def rows(ref):
            b = self.b if ref.shape[0] > 1 else jnp.int32(0)
            return _load_rows(ref, (b,), row0, size_q, p.q_len, True)[:, None]

        def cols(ref):
            b = self.b if ref.shape[0] > 1 else jnp.int32(0)
            return _load_rows(ref, (b,), col0, size_k, p.kv_len, True)[None, :]

        segments = () if not e.segments else (rows(e.segments[0]), cols(e.segments[1]))
        return self.consts._replace(bounds=tuple(rows(r) for r in e.bounds), segments=segments,
                                    mask_consts=e.mask_consts)

    def _mask_tile(self, row0, col0, idx: Index):
        p, ref = self.p, self.extras.mask
        if ref is None:
            return None
        lm, sm = ref.shape[-2:]
        size_q, size_k = idx.q.shape[0], idx.kv.shape[1]
        index = (self.mask_head,  # masked loads need arrays
                 pl.ds(row0, size_q) if lm > 1 else pl.ds(0, 1),
                 pl.ds(col0, size_k) if sm > 1 else pl.ds(0, 1))
        valid = None
        if lm > 1 and p.q_len % size_q:
            valid = idx.q < p.q_len
        if sm > 1 and p.kv_len % size_k:
            valid = idx.kv < p.kv_len if valid is None else valid & (idx.kv < p.kv_len)
        tile = ref[index] if valid is None else plgpu.load(ref.at[index], mask=valid, other=0)
        return tile != 0 if p.mask_is_bool else tile.astype(jnp.float32)

    def keep(self, row0, col0, size_q: int, size_k: int):
        """The dropout keep-mask of the tile at ``(row0, col0)`` (None without dropout)."""
        if self.seed is None:
            return None
        rows, cols = _coords(row0, col0, size_q, size_k)
        return dropout_keep(self.seed, self.p.dropout_p, self.b, self.h, self.p.q_heads, rows,
                            cols)


def _coords(row0, col0, size_q: int, size_k: int):
    """Row indices ``(size_q, 1)`` and column indices ``(1, size_k)`` of a tile."""
    return row0 + jnp.arange(size_q)[:, None], col0 + jnp.arange(size_k)[None, :]


def _visit(vis: pc.Visits, refs, b, h, n, body, carry, any_full: bool = True):
    """Runs ``body(other_block, masked, carry)`` over the blocks block ``n`` of (b, h) visits:
    the FULL ones unmasked, then the PARTIAL ones masked. ``any_full=False``: there are none
    (their unmasked tiles would not even fit the sequence)."""
    n_full, n_visible, row = vis.read(refs, b, h, n)
    order = refs[2]

    def step(masked: bool):
        return lambda t, carry: body(order[row * vis.width + t], masked, carry)

    if any_full:
        carry = lax.fori_loop(0, n_full, step(False), carry)
    return lax.fori_loop(n_full, n_visible, step(True), carry)


def _query_block(p: Problem, bq: int):
    """This program's query block; under a causal mask the longest rows are launched first."""
    i = pl.program_id(0)
    return i if p.causal_offset is None else cdiv(p.q_len, bq) - 1 - i


def _fwd_kernel(*refs, p: Problem, bq: int, bk: int, vis: pc.Visits):
    q_ref, k_ref, v_ref, extras, rest = pc.split_refs(p, refs)
    *visit_refs, o_ref, lse_ref = rest
    i, b, h = _query_block(p, bq), pl.program_id(1), pl.program_id(2)
    scores = _Scores(p, extras, b, h)
    ragged_q, ragged_k = p.q_len % bq != 0, p.kv_len % bk != 0
    q = _load(q_ref, (), i * bq, bq, p.q_len, p.head_dim, ragged_q)

    def body(j, masked: bool, carry):
        acc, row_max, total = carry
        check = masked and ragged_k  # FULL blocks lie within the keys
        k = _load(k_ref, (), j * bk, bk, p.kv_len, p.head_dim, check)
        v = _load(v_ref, (), j * bk, bk, p.kv_len, p.v_head_dim, check)
        s = scores(scores.raw(q, k), i * bq, j * bk, masked)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        safe_max = finite_or_zero(new_max)
        correction = jnp.exp2(row_max - safe_max)
        weights = jnp.exp2(s - safe_max[:, None])
        total = total * correction + jnp.sum(weights, axis=1)
        keep = scores.keep(i * bq, j * bk, bq, bk)
        if keep is not None:
            weights = jnp.where(keep, weights, 0.0)
        pv = _dot(weights.astype(v.dtype), v)
        return acc * correction[:, None] + pv, new_max, total

    carry = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
             jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, row_max, total = _visit(vis, visit_refs, b, h, i, body, carry, p.kv_len >= bk)
    visible = total > 0
    safe_total = jnp.where(visible, total, 1.0)
    out = acc / safe_total[:, None]
    if p.has_dropout:
        out = out / (1.0 - p.dropout_p)
    lse = jnp.where(visible, finite_or_zero(row_max) * LN2 + jnp.log(safe_total), -jnp.inf)
    _store(o_ref, out, i * bq, p.q_len, p.v_head_dim, ragged_q)
    _store_rows(lse_ref, lse, i * bq, p.q_len, ragged_q)


def _dq_kernel(*refs, p: Problem, bq: int, bk: int, vis: pc.Visits):
    q_ref, k_ref, v_ref, extras, rest = pc.split_refs(p, refs)
    *visit_refs, do_ref, lse_ref, delta_ref, dq_ref = rest
    i, b, h = _query_block(p, bq), pl.program_id(1), pl.program_id(2)
    scores = _Scores(p, extras, b, h)
    ragged_q, ragged_k = p.q_len % bq != 0, p.kv_len % bk != 0
    q = _load(q_ref, (), i * bq, bq, p.q_len, p.head_dim, ragged_q)
    do = _load(do_ref, (), i * bq, bq, p.q_len, p.v_head_dim, ragged_q)
    lse = _load_rows(lse_ref, (), i * bq, bq, p.q_len, ragged_q)
    lse = finite_or_zero(lse) * LOG2E  # hidden rows: exp2(-inf - 0) = 0
    delta = _load_rows(delta_ref, (), i * bq, bq, p.q_len, ragged_q)

    def body(j, masked: bool, dq):
        check = masked and ragged_k
        k = _load(k_ref, (), j * bk, bk, p.kv_len, p.head_dim, check)
        v = _load(v_ref, (), j * bk, bk, p.kv_len, p.v_head_dim, check)
        raw = scores.raw(q, k)
        probs = jnp.exp2(scores(raw, i * bq, j * bk, masked) - lse[:, None])
        dp = _dot(do, v, pc.NT)
        keep = scores.keep(i * bq, j * bk, bq, bk)
        if keep is not None:
            dp = jnp.where(keep, dp * (1.0 / (1.0 - p.dropout_p)), 0.0)
        ds = scores.vjp(raw, i * bq, j * bk, probs * (dp - delta[:, None]))
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros((bq, q_ref.shape[-1]), jnp.float32)
    dq = _visit(vis, visit_refs, b, h, i, body, dq, p.kv_len >= bk)
    _store(dq_ref, dq * jnp.float32(p.scale), i * bq, p.q_len, p.head_dim, ragged_q)


def _dkdv_kernel(*refs, p: Problem, bq: int, bk: int, vis: pc.Visits):
    q_ref, k_ref, v_ref, extras, rest = pc.split_refs(p, refs)
    *visit_refs, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ragged_q, ragged_k = p.q_len % bq != 0, p.kv_len % bk != 0
    k = _load(k_ref, (), j * bk, bk, p.kv_len, p.head_dim, ragged_k)
    v = _load(v_ref, (), j * bk, bk, p.kv_len, p.v_head_dim, ragged_k)
    mask_heads = 1 if extras.mask is None else extras.mask.shape[0]

    def group(g, carry):
        h = hk * p.groups + g
        scores = _Scores(p, extras, b, h, g if mask_heads > 1 else 0)

        def body(i, masked: bool, carry):
            dk, dv = carry
            q = _load(q_ref, (g,), i * bq, bq, p.q_len, p.head_dim, ragged_q)
            do = _load(do_ref, (g,), i * bq, bq, p.q_len, p.v_head_dim, ragged_q)
            lse = _load_rows(lse_ref, (g,), i * bq, bq, p.q_len, ragged_q)
            lse = finite_or_zero(lse) * LOG2E  # hidden rows: exp2(-inf - 0) = 0
            delta = _load_rows(delta_ref, (g,), i * bq, bq, p.q_len, ragged_q)
            raw = scores.raw(q, k)
            probs = jnp.exp2(scores(raw, i * bq, j * bk, masked) - lse[:, None])
            dp = _dot(do, v, pc.NT)
            keep = scores.keep(i * bq, j * bk, bq, bk)
            dropped = probs
            if keep is not None:
                inv_keep = 1.0 / (1.0 - p.dropout_p)
                dropped = jnp.where(keep, probs * inv_keep, 0.0)
                dp = jnp.where(keep, dp * inv_keep, 0.0)
            dv = dv + _dot(dropped.astype(do.dtype), do, _TN)
            ds = scores.vjp(raw, i * bq, j * bk, probs * (dp - delta[:, None]))
            dk = dk + _dot(ds.astype(q.dtype), q, _TN)
            return dk, dv

        return _visit(vis, visit_refs, b, h, j, body, carry)

    carry = (jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
             jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
    dk, dv = lax.fori_loop(0, p.groups, group, carry)
    _store(dk_ref, dk * jnp.float32(p.scale), j * bk, p.kv_len, p.head_dim, ragged_k)
    _store(dv_ref, dv, j * bk, p.kv_len, p.v_head_dim, ragged_k)


def _compiler_params(warps: int, stages: int):
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


class _Call:
    """BlockSpecs over a grid ``(blocks, batch, heads)``. Every q/k/v ref is one (batch, head)
    slab (one GQA group of query heads where ``per_group``) holding the whole sequence: the
    kernels slice their tiles themselves, with masked loads at ragged ends. The structured
    mask's operands, captured arrays and visit lists are whole arrays."""

    def __init__(self, p: Problem, per_group: bool):
        self.p, self.per_group = p, per_group
        self.pad_e, self.pad_ev = _pow2(p.head_dim), _pow2(p.v_head_dim)
        sq = pl.squeezed
        self.q_heads = p.groups if per_group else sq
        self.q_index = lambda n, b, h: (b, h, 0, 0)  # noqa: E731
        self.kv_index = self.q_index if per_group else (
            lambda n, b, h: (b, lax.div(h, p.groups), 0, 0))

    def q_side(self, width: int):
        return pl.BlockSpec((pl.squeezed, self.q_heads, self.p.q_len, width), self.q_index)

    def rows(self):
        return pl.BlockSpec((pl.squeezed, self.q_heads, self.p.q_len), lambda n, b, h: (b, h, 0))

    def kv_side(self, width: int):
        return pl.BlockSpec((pl.squeezed, pl.squeezed, self.p.kv_len, width), self.kv_index)

    def inputs(self, extras: Extras, visit_lists):
        """Specs of q, k, v, ``pc.kernel_operands(extras)`` and the visit lists."""
        p = self.p
        specs = [self.q_side(self.pad_e), self.kv_side(self.pad_e), self.kv_side(self.pad_ev)]
        whole = [_whole(x) for x in (*pc.kernel_operands(p, extras), *visit_lists)]
        if p.has_mask:
            bm, hm, lm, sm = p.mask_shape
            heads = (p.groups if self.per_group else 1) if hm > 1 else 1
            whole[0] = pl.BlockSpec(
                (pl.squeezed, heads, lm, sm),
                lambda n, b, h: (b if bm > 1 else 0, h if hm > 1 else 0, 0, 0))
        return specs + whole


def _whole(x):
    """The spec of an operand every program reads whole."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _forward_call(p: Problem, cfg: Config, vis: pc.Visits, *, interpret):
    call = _Call(p, per_group=False)

    def run(q, k, v, extras, visit_lists):
        rows = (p.batch, p.q_heads, p.q_len)
        return pl.pallas_call(
            functools.partial(_fwd_kernel, p=p, bq=cfg.block_q, bk=cfg.block_k, vis=vis),
            grid=(cdiv(p.q_len, cfg.block_q), p.batch, p.q_heads),
            in_specs=call.inputs(extras, visit_lists),
            out_specs=[call.q_side(call.pad_ev), call.rows()],
            out_shape=[jax.ShapeDtypeStruct((*rows, p.v_head_dim), q.dtype),
                       jax.ShapeDtypeStruct(rows, jnp.float32)],
            compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages),
            interpret=interpret, name="transformax_flash_fwd",
        )(q, k, v, *pc.kernel_operands(p, extras), *visit_lists)
    return run


def _backward_call(p: Problem, cfg: Config, vis_dq: pc.Visits, vis_dkdv: pc.Visits, *,
                   interpret):
    per_q, per_kv = _Call(p, per_group=False), _Call(p, per_group=True)
    params = _compiler_params(cfg.bwd_warps, cfg.bwd_stages)

    def run(q, k, v, extras, lists_dq, lists_dkdv, out, lse, dout, dlse):
        delta = row_delta(out, dout, dlse)
        operands = pc.kernel_operands(p, extras)
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, p=p, bq=cfg.block_q_dq, bk=cfg.block_k_dq, vis=vis_dq),
            grid=(cdiv(p.q_len, cfg.block_q_dq), p.batch, p.q_heads),
            in_specs=[*per_q.inputs(extras, lists_dq), per_q.q_side(per_q.pad_ev), per_q.rows(),
                      per_q.rows()],
            out_specs=per_q.q_side(per_q.pad_e),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=params, interpret=interpret, name="transformax_flash_dq",
        )(q, k, v, *operands, *lists_dq, dout, lse, delta)
        dk, dv = pl.pallas_call(
            functools.partial(_dkdv_kernel, p=p, bq=cfg.block_q_dkv, bk=cfg.block_k_dkv,
                              vis=vis_dkdv),
            grid=(cdiv(p.kv_len, cfg.block_k_dkv), p.batch, p.kv_heads),
            in_specs=[*per_kv.inputs(extras, lists_dkdv), per_kv.q_side(per_kv.pad_ev),
                      per_kv.rows(), per_kv.rows()],
            out_specs=[per_kv.kv_side(per_kv.pad_e), per_kv.kv_side(per_kv.pad_ev)],
            out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                       jax.ShapeDtypeStruct(v.shape, v.dtype)],
            compiler_params=params, interpret=interpret, name="transformax_flash_dkdv",
        )(q, k, v, *operands, *lists_dkdv, dout, lse, delta)
        return dq, dk, dv
    return run


def forward(problem: Problem, q, k, v, extras: Extras, config: Config | None = None,
            interpret=None):
    """``config`` defaults to ``default_config(problem)``; ``interpret`` to per-platform (see
    ``pallas_common.per_platform``)."""
    cfg = config or default_config(problem)
    vis, lists = pc.visits(problem, extras, cfg.block_q, cfg.block_k)
    build = functools.partial(_forward_call, problem, cfg, vis)
    return tuple(pc.per_platform(build, q, k, v, extras, lists, interpret=interpret))


def backward(problem: Problem, q, k, v, extras: Extras, out, lse, dout, dlse,
             config: Config | None = None, interpret=None):
    """The score_mod's captured arrays get their gradients from a separate blockwise plain-JAX
    pass (``xla_flash.backward``, whose dq/dk/dv go unused): accumulating them in the kernels
    would need scatters Triton cannot lower."""
    cfg = config or default_config(problem)
    vis_dq, lists_dq = pc.visits(problem, extras, cfg.block_q_dq, cfg.block_k_dq)
    vis_dkdv, lists_dkdv = pc.visits(problem, extras, cfg.block_q_dkv, cfg.block_k_dkv,
                                     transpose=True)
    build = functools.partial(_backward_call, problem, cfg, vis_dq, vis_dkdv)
    dq, dk, dv = pc.per_platform(build, q, k, v, extras, lists_dq, lists_dkdv, out, lse, dout,
                                 dlse, interpret=interpret)
    return dq, dk, dv, pc.score_consts_gradients(problem, q, k, v, extras, out, lse, dout, dlse)
