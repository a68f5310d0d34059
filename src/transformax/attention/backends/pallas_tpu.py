"""Flash attention as Pallas kernels for TPUs (Mosaic).

Forward: grid ``(batch, query head, query block, key block)``, the key block innermost and
sequential; the running max and sum and the f32 output accumulator stay in VMEM across it. Key
blocks a causal mask hides are neither computed nor fetched (their index map repeats the last
visible block, so the pipeline issues no copy); blocks it shows completely skip the masking
work. The backward pass recomputes the probabilities from the saved log-sum-exp in two kernels:
dq over the forward's grid, and dk/dv over ``(batch, key/value head, key block, query head of
the GQA group, query block)``, accumulating the whole group in VMEM (K/V are never repeated).

Blocks default to 512 x 512: 128 x 128 tiles leave the MXU of v5e-class chips mostly idle.
Ragged sequence ends are masked in the kernels (no padding copies); a bool mask is read as
int8.

In interpret mode inside ``tfx.sdpa`` the kernels run under Pallas's generic interpreter: the
TPU interpreter (``pltpu.InterpretParams``, which also simulates DMAs and fills out-of-bounds
reads with NaN) has ordered IO effects the attention primitive cannot carry. Pass
``interpret=pltpu.InterpretParams()`` to ``forward``/``backward`` to use it (the tests do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from transformax.attention.backends import pallas_common as pc
from transformax.attention import tile_math
from transformax.attention.problem import Extras, Problem, cdiv
from transformax.attention.tile_math import Index, dropout_keep, finite_or_zero, row_delta

_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
_PARALLEL, _ARBITRARY = pltpu.PARALLEL, pltpu.ARBITRARY

NAME = "pallas_tpu"
FEATURES = frozenset({"dense mask", "dropout"})


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes. Each must be the full sequence length or a multiple of 128 (of 8 for the
    query side); interpret mode accepts any."""

    block_q: int = 512
    block_k: int = 512
    block_q_bwd: int = 512
    block_k_bwd: int = 512


def default_config(problem: Problem) -> Config:
    """512-row tiles, or the whole sequence where it is shorter."""
    def fit(block: int, length: int) -> int:
        return length if length <= block else block
    cfg = Config()
    return Config(fit(cfg.block_q, problem.q_len), fit(cfg.block_k, problem.kv_len),
                  fit(cfg.block_q_bwd, problem.q_len), fit(cfg.block_k_bwd, problem.kv_len))


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    reasons = pc.cpu_reasons(platform)
    if platform == "cpu":
        supported = _DTYPES + (np.dtype(jnp.float16),)
    else:
        supported = _DTYPES
    if problem.dtype not in supported:
        reasons.append(f"dtype {problem.dtype} is not supported on {platform} "
                       f"({', '.join(str(d) for d in supported)})")
    return reasons


class _Tile:
    """The score/dropout math of one (query block, key block) tile, shared by the kernels."""

    def __init__(self, p: Problem, mask_ref, seed_ref, batch_head, row0, col0, shape):
        self.p, self.mask_ref, self.batch_head = p, mask_ref, batch_head
        self.seed = None if seed_ref is None else (seed_ref[0], seed_ref[1])
        self.rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
        self.cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)

    def scores(self, q, k, edge: bool):
        """f32 ``scale * q k^T (+ mask)``, masked; ``edge`` tiles also get the causal and
        sequence-end masks."""
        p = self.p
        s = lax.dot_general(q, k, pc.NT, preferred_element_type=jnp.float32)
        s = s * jnp.float32(p.scale)
        tile = None
        if self.mask_ref is not None:
            tile = self.mask_ref[...]
            tile = tile.astype(jnp.int32) != 0 if p.mask_is_bool else tile.astype(jnp.float32)
        if edge or tile is not None:
            dense_only = dataclasses.replace(p, causal_offset=None)
            s = tile_math.scores(p if edge else dense_only, Extras(), s,
                                 Index(0, 0, self.rows, self.cols), tile)
        if edge and p.kv_len % k.shape[0]:
            s = jnp.where(self.cols < p.kv_len, s, -jnp.inf)
        return s

    def keep(self):
        """The dropout keep-mask (None without dropout)."""
        if self.seed is None:
            return None
        return dropout_keep(self.seed, self.p.dropout_p, self.batch_head, self.rows, self.cols)


def _zero_rows(x, row0, length: int):
    """``x`` with rows at or beyond ``length`` set to zero (out-of-bounds block reads are
    unspecified on TPU)."""
    rows = row0 + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows < length, x, jnp.zeros((), x.dtype))


def _when_visible(n_full, n_visible, j, compute):
    """Runs ``compute(edge)`` for key block ``j``: without causal masking below ``n_full``, with
    it below ``n_visible``, not at all beyond."""
    if not (isinstance(n_full, int) and n_full == 0):
        pl.when(j < n_full)(functools.partial(compute, False))
    if not (isinstance(n_full, int) and n_full == n_visible):
        pl.when((j >= n_full) & (j < n_visible))(functools.partial(compute, True))


def _fwd_kernel(*refs, p: Problem, bq: int, bk: int):
    q_ref, k_ref, v_ref, mask_ref, seed_ref, rest = pc.split_refs(p, refs)
    o_ref, lse_ref, max_ref, total_ref, acc_ref = rest
    b, h, i, j = (pl.program_id(n) for n in range(4))

    @pl.when(j == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(edge: bool):
        t = _Tile(p, mask_ref, seed_ref, b * p.q_heads + h, i * bq, j * bk, (bq, bk))
        v = v_ref[...]
        if edge and p.kv_len % bk:
            v = _zero_rows(v, j * bk, p.kv_len)
        s = t.scores(q_ref[...], k_ref[...], edge)
        row_max = max_ref[...]
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        safe_max = finite_or_zero(new_max)
        correction = jnp.exp(row_max - safe_max)
        weights = jnp.exp(s - safe_max)
        total_ref[...] = total_ref[...] * correction + jnp.sum(weights, axis=1, keepdims=True)
        keep = t.keep()
        if keep is not None:
            weights = jnp.where(keep, weights, 0.0)
        pv = jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * correction + pv
        max_ref[...] = new_max

    _when_visible(*pc.key_blocks(p, i, bq, bk), j, compute)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        total = total_ref[...]
        visible = total > 0
        safe_total = jnp.where(visible, total, 1.0)
        out = acc_ref[...] / safe_total
        if p.has_dropout:
            out = out / (1.0 - p.dropout_p)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.where(visible, finite_or_zero(max_ref[...]) + jnp.log(safe_total),
                                 -jnp.inf)


def _dq_kernel(*refs, p: Problem, bq: int, bk: int):
    q_ref, k_ref, v_ref, mask_ref, seed_ref, rest = pc.split_refs(p, refs)
    do_ref, lse_ref, delta_ref, dq_ref, acc_ref = rest
    b, h, i, j = (pl.program_id(n) for n in range(4))

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(edge: bool):
        t = _Tile(p, mask_ref, seed_ref, b * p.q_heads + h, i * bq, j * bk, (bq, bk))
        k, v = k_ref[...], v_ref[...]
        if edge and p.kv_len % bk:
            k, v = _zero_rows(k, j * bk, p.kv_len), _zero_rows(v, j * bk, p.kv_len)
        probs = jnp.exp(t.scores(q_ref[...], k, edge) - finite_or_zero(lse_ref[...]))
        dp = lax.dot_general(do_ref[...], v, pc.NT, preferred_element_type=jnp.float32)
        keep = t.keep()
        if keep is not None:
            dp = jnp.where(keep, dp * (1.0 / (1.0 - p.dropout_p)), 0.0)
        ds = probs * (dp - delta_ref[...])
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when_visible(*pc.key_blocks(p, i, bq, bk), j, compute)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * jnp.float32(p.scale)).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, p: Problem, bq: int, bk: int):
    q_ref, k_ref, v_ref, mask_ref, seed_ref, rest = pc.split_refs(p, refs)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = rest
    b, hk, j, g, i = (pl.program_id(n) for n in range(5))
    first, first_full = pc.query_blocks(p, j, bq, bk)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def compute(edge: bool):
        t = _Tile(p, mask_ref, seed_ref, b * p.q_heads + hk * p.groups + g, i * bq, j * bk,
                  (bq, bk))
        q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
        if p.q_len % bq:
            q, do, lse, delta = (_zero_rows(x, i * bq, p.q_len) for x in (q, do, lse, delta))
        probs = jnp.exp(t.scores(q, k_ref[...], edge) - finite_or_zero(lse))
        if p.q_len % bq:  # rows past the end: their mask tile rows are unspecified (NaN)
            probs = jnp.where(t.rows < p.q_len, probs, 0.0)
        dp = lax.dot_general(do, v_ref[...], pc.NT, preferred_element_type=jnp.float32)
        keep = t.keep()
        dropped = probs
        if keep is not None:
            inv_keep = 1.0 / (1.0 - p.dropout_p)
            dropped = jnp.where(keep, probs * inv_keep, 0.0)
            dp = jnp.where(keep, dp * inv_keep, 0.0)
        # p^T @ dO as an explicit transpose and a plain matmul, the form Mosaic is known to
        # compile (jax's own TPU flash attention does the same).
        dv_acc[...] += jnp.dot(dropped.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        ds = probs * (dp - delta)
        dk_acc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    pl.when((i >= first) & (i < first_full))(functools.partial(compute, True))
    pl.when(i >= first_full)(functools.partial(compute, False))

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * jnp.float32(p.scale)).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _mask_spec(p: Problem, bq: int, bk: int, index):
    """The dense mask's tile; ``index(grid) -> (b, q head, q block, k block)``."""
    bm, hm, lm, sm = p.mask_shape
    sq = pl.squeezed

    def mask_index(*grid):
        b, h, i, j = index(*grid)
        return (b if bm > 1 else 0, h if hm > 1 else 0, i if lm > 1 else 0, j if sm > 1 else 0)
    return pl.BlockSpec((sq, sq, bq if lm > 1 else 1, bk if sm > 1 else 1), mask_index)


def _inputs(p: Problem, q, k, v, mask, seed, q_spec, kv_spec, mask_spec):
    specs, operands = [q_spec, *kv_spec], [q, k, v]
    if mask is not None:
        specs.append(mask_spec)
        operands.append(mask.astype(jnp.int8) if p.mask_is_bool else mask)
    if seed is not None:
        specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        operands.append(seed)
    return specs, operands


def _pallas(kernel, grid, semantics, interpret, name, **kwargs):
    return pl.pallas_call(
        kernel, grid=grid, name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret, **kwargs)


def _kv_block(p: Problem, bq: int, bk: int):
    """Index of the key block to fetch at step ``j`` of query block ``i``: past the last visible
    block it stays there, so hidden blocks cost no copy."""
    def index(i, j):
        if p.causal_offset is None:
            return j
        _, n_visible = pc.key_blocks(p, i, bq, bk)
        return jnp.minimum(j, jnp.maximum(n_visible - 1, 0))
    return index


def _row_major_specs(p: Problem, bq: int, bk: int):
    """q-side, k/v, per-row and mask specs over the grid ``(b, h, i, j)``."""
    sq = pl.squeezed
    kv_block = _kv_block(p, bq, bk)
    q_index = lambda b, h, i, j: (b, h, i, 0)  # noqa: E731
    kv_index = lambda b, h, i, j: (b, lax.div(h, p.groups), kv_block(i, j), 0)  # noqa: E731

    def q_side(width):
        return pl.BlockSpec((sq, sq, bq, width), q_index)

    def kv_side(width):
        return pl.BlockSpec((sq, sq, bk, width), kv_index)

    rows = pl.BlockSpec((sq, sq, bq, 1), q_index)
    mask = _mask_spec(p, bq, bk, lambda b, h, i, j: (b, h, i, kv_block(i, j))) \
        if p.has_mask else None
    return q_side, kv_side, rows, mask


def _forward_call(p: Problem, cfg: Config, *, interpret):
    bq, bk = cfg.block_q, cfg.block_k
    q_side, kv_side, rows, mask_spec = _row_major_specs(p, bq, bk)

    def run(q, k, v, mask, seed):
        specs, operands = _inputs(p, q, k, v, mask, seed, q_side(p.head_dim),
                                  (kv_side(p.head_dim), kv_side(p.v_head_dim)), mask_spec)
        out_rows = (p.batch, p.q_heads, p.q_len)
        out, lse = _pallas(
            functools.partial(_fwd_kernel, p=p, bq=bq, bk=bk),
            (p.batch, p.q_heads, cdiv(p.q_len, bq), cdiv(p.kv_len, bk)),
            (_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY), interpret, "transformax_flash_fwd",
            in_specs=specs, out_specs=[q_side(p.v_head_dim), rows],
            out_shape=[jax.ShapeDtypeStruct((*out_rows, p.v_head_dim), q.dtype),
                       jax.ShapeDtypeStruct((*out_rows, 1), jnp.float32)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, p.v_head_dim), jnp.float32)],
        )(*operands)
        return out, lse[..., 0]
    return run


def _dq_call(p: Problem, cfg: Config, interpret, q, k, v, mask, seed, dout, lse, delta):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    q_side, kv_side, rows, mask_spec = _row_major_specs(p, bq, bk)
    specs, operands = _inputs(p, q, k, v, mask, seed, q_side(p.head_dim),
                              (kv_side(p.head_dim), kv_side(p.v_head_dim)), mask_spec)
    return _pallas(
        functools.partial(_dq_kernel, p=p, bq=bq, bk=bk),
        (p.batch, p.q_heads, cdiv(p.q_len, bq), cdiv(p.kv_len, bk)),
        (_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY), interpret, "transformax_flash_dq",
        in_specs=[*specs, q_side(p.v_head_dim), rows, rows], out_specs=q_side(p.head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, p.head_dim), jnp.float32)],
    )(*operands, dout, lse, delta)


def _dkdv_call(p: Problem, cfg: Config, interpret, q, k, v, mask, seed, dout, lse, delta):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    sq, nq = pl.squeezed, cdiv(p.q_len, bq)

    def q_block(j, i):  # query blocks before the first that sees key block j are not fetched
        if p.causal_offset is None:
            return i
        first, _ = pc.query_blocks(p, j, bq, bk)
        return jnp.minimum(jnp.maximum(i, first), nq - 1)

    q_index = lambda b, hk, j, g, i: (b, hk * p.groups + g, q_block(j, i), 0)  # noqa: E731
    kv_index = lambda b, hk, j, g, i: (b, hk, j, 0)  # noqa: E731

    def q_side(width):
        return pl.BlockSpec((sq, sq, bq, width), q_index)

    def kv_side(width):
        return pl.BlockSpec((sq, sq, bk, width), kv_index)

    rows = pl.BlockSpec((sq, sq, bq, 1), q_index)
    mask_spec = _mask_spec(p, bq, bk, lambda b, hk, j, g, i: (b, hk * p.groups + g,
                                                             q_block(j, i), j)) \
        if p.has_mask else None
    specs, operands = _inputs(p, q, k, v, mask, seed, q_side(p.head_dim),
                              (kv_side(p.head_dim), kv_side(p.v_head_dim)), mask_spec)
    return _pallas(
        functools.partial(_dkdv_kernel, p=p, bq=bq, bk=bk),
        (p.batch, p.kv_heads, cdiv(p.kv_len, bk), p.groups, nq),
        (_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY), interpret,
        "transformax_flash_dkdv",
        in_specs=[*specs, q_side(p.v_head_dim), rows, rows],
        out_specs=[kv_side(p.head_dim), kv_side(p.v_head_dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, p.head_dim), jnp.float32),
                        pltpu.VMEM((bk, p.v_head_dim), jnp.float32)],
    )(*operands, dout, lse, delta)


def _backward_call(p: Problem, cfg: Config, *, interpret):
    def run(q, k, v, mask, seed, out, lse, dout, dlse):
        delta = row_delta(out, dout, dlse)
        args = (q, k, v, mask, seed, dout, lse[..., None], delta[..., None])
        dq = _dq_call(p, cfg, interpret, *args)
        dk, dv = _dkdv_call(p, cfg, interpret, *args)
        return dq, dk, dv
    return run


def forward(problem: Problem, q, k, v, extras: Extras, config: Config | None = None,
            interpret=None):
    """``config`` defaults to ``default_config(problem)``; ``interpret`` to per-platform (see
    ``pallas_common.per_platform``)."""
    build = functools.partial(_forward_call, problem, config or default_config(problem))
    return tuple(pc.per_platform(build, q, k, v, extras.mask, extras.seed, interpret=interpret))


def backward(problem: Problem, q, k, v, extras: Extras, out, lse, dout, dlse,
             config: Config | None = None, interpret=None):
    build = functools.partial(_backward_call, problem, config or default_config(problem))
    dq, dk, dv = pc.per_platform(build, q, k, v, extras.mask, extras.seed, out, lse, dout, dlse,
                                 interpret=interpret)
    return dq, dk, dv, ()
