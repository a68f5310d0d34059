"""Flash attention as Pallas kernels for TPUs (Mosaic).

Forward: grid ``(batch, query head, query block, visit)``, the visits innermost and
sequential; the running max and sum and the f32 output accumulator stay in VMEM across them.
Each query block visits the key blocks ``blocks.classify`` leaves visible (scalar-prefetched
``pallas_common.visits`` lists, per batch and head where the mask depends on them): FULL ones
without masking work, then PARTIAL ones masked; EMPTY ones are neither computed nor fetched
(past the last visit the index map repeats it, so the pipeline issues no copy). The backward
pass recomputes the probabilities from the saved log-sum-exp in two kernels: dq over the
forward's grid, and dk/dv over ``(batch, key/value head, key block, query head of the GQA
group, visit)``, accumulating the whole group in VMEM (K/V are never repeated).

Scores, masks (causal offset, key intervals, segment ids, mask_mod, dense), score_mod and
dropout are ``tile_math``'s, on the tile's index arrays; the structured mask's per-row and
per-key arrays arrive as blocks of the tile, the mask_mod/score_mod captured arrays whole:
in SMEM those read one element at a position of the batch and head (``slopes[h]``,
``offsets[b]``: scalar loads, ``tile_hooks``), in VMEM those read whole. Mosaic has no vector
gather, so a hook reading a captured array at per-element positions (``table[q_idx - kv_idx]``,
``ids[b, q_idx]``) runs only in interpret mode (``reasons_unsupported`` says so on tpu). The
score_mod's captured arrays get their gradients from a separate plain-JAX pass
(``pallas_common.score_consts_gradients``).

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
from transformax.attention import tile_hooks, tile_math
from transformax.attention.problem import Extras, Problem, cdiv
from transformax.attention.tile_math import Index, dropout_keep, finite_or_zero, row_delta

_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
_PARALLEL, _ARBITRARY = pltpu.PARALLEL, pltpu.ARBITRARY

NAME = "pallas_tpu"
FEATURES = frozenset({"dense mask", "dropout", "key intervals", "segment ids", "mask_mod",
                      "score_mod"})


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
    reasons = pc.cpu_reasons(platform) + pc.indexing_reasons(problem, platform,
                                                            vector_loads=False)
    if platform == "cpu":
        supported = _DTYPES + (np.dtype(jnp.float16),)
    else:
        supported = _DTYPES
    if problem.dtype not in supported:
        reasons.append(f"dtype {problem.dtype} is not supported on {platform} "
                       f"({', '.join(str(d) for d in supported)})")
    return reasons


class _Tile:
    """The score/dropout math of one (query block, key block) tile through ``tile_math``,
    shared by the kernels. ``extras``: refs of this tile's blocks of the structured mask's
    operands (lo, hi, q_ids ``(bq, 1)``; kv_ids ``(1, bk)``), the dense mask's tile, and the
    whole captured arrays."""

    def __init__(self, p: Problem, extras: Extras, b, h, row0, col0, shape):
        self.p = p
        self.seed = None if extras.seed is None else tuple(
            extras.seed[i] for i in range(extras.seed.shape[0]))
        self.idx = Index(b, h, row0 + lax.broadcasted_iota(jnp.int32, shape, 0),
                         col0 + lax.broadcasted_iota(jnp.int32, shape, 1))
        self.extras = extras
        self.consts = Extras(score_consts=extras.score_consts)  # refs: read by ``tile_hooks``

    def raw(self, q, k):
        """f32 ``scale * q k^T``: natural-log units, what score_mod sees."""
        s = lax.dot_general(q, k, pc.NT, preferred_element_type=jnp.float32)
        return s * jnp.float32(self.p.scale)

    def scores(self, raw, masked: bool):
        """The scores the softmax sees: score_mod, and for ``masked`` (PARTIAL) tiles every
        mask and the sequence end."""
        p, e, idx = self.p, self.extras, self.idx
        if not masked:
            return tile_math.score_mod(p, self.consts, raw, idx)
        tile = None
        if e.mask is not None:
            tile = e.mask[...]
            tile = tile.astype(jnp.int32) != 0 if p.mask_is_bool else tile.astype(jnp.float32)
        tile_extras = self.consts._replace(
            bounds=tuple(r[...] for r in e.bounds), segments=tuple(r[...] for r in e.segments),
            mask_consts=e.mask_consts)
        s = tile_math.scores(p, tile_extras, raw, idx, tile, gathered=True)
        if p.kv_len % raw.shape[1]:
            s = jnp.where(idx.kv < p.kv_len, s, -jnp.inf)
        return s

    def vjp(self, raw, ds):
        """The gradient of the raw scores from that of the modified ones."""
        return tile_math.score_mod_vjp(self.p, self.consts, raw, self.idx, ds)[0]

    def keep(self):
        """The dropout keep-mask (None without dropout)."""
        if self.seed is None:
            return None
        idx = self.idx
        return dropout_keep(self.seed, self.p.dropout_p, idx.b, idx.h, self.p.q_heads, idx.q,
                            idx.kv)


def _zero_rows(x, row0, length: int):
    """``x`` with rows at or beyond ``length`` set to zero (out-of-bounds block reads are
    unspecified on TPU)."""
    rows = row0 + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows < length, x, jnp.zeros((), x.dtype))


def _visit(vis: pc.Visits, lists, b, h, n, step, compute):
    """Runs ``compute(other_block, masked)`` at grid step ``step`` of block ``n`` of (b, h):
    its FULL visits unmasked, then its PARTIAL ones masked, nothing past them."""
    n_full, n_visible, row = vis.read(lists, b, h, n)
    other = lists[2][row * vis.width + step]
    pl.when(step < n_full)(lambda: compute(other, False))
    pl.when((step >= n_full) & (step < n_visible))(lambda: compute(other, True))


def _fetched(vis: pc.Visits, lists, b, h, n, step):
    """The block fetched at grid step ``step`` of block ``n``: past its last visit it stays
    there, so skipped blocks cost no copy."""
    _, n_visible, row = vis.read(lists, b, h, n)
    last = jnp.maximum(n_visible - 1, 0)
    return lists[2][row * vis.width + jnp.minimum(step, last)]


def _fwd_kernel(*refs, p: Problem, bq: int, bk: int, vis: pc.Visits):
    lists, refs = refs[:3], refs[3:]
    q_ref, k_ref, v_ref, extras, rest = pc.split_refs(p, refs)
    o_ref, lse_ref, max_ref, total_ref, acc_ref = rest
    b, h, i, n = (pl.program_id(x) for x in range(4))

    @pl.when(n == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(j, masked: bool):
        t = _Tile(p, extras, b, h, i * bq, j * bk, (bq, bk))
        v = v_ref[...]
        if masked and p.kv_len % bk:
            v = _zero_rows(v, j * bk, p.kv_len)
        s = t.scores(t.raw(q_ref[...], k_ref[...]), masked)
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

    _visit(vis, lists, b, h, i, n, compute)

    @pl.when(n == pl.num_programs(3) - 1)
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


def _dq_kernel(*refs, p: Problem, bq: int, bk: int, vis: pc.Visits):
    lists, refs = refs[:3], refs[3:]
    q_ref, k_ref, v_ref, extras, rest = pc.split_refs(p, refs)
    do_ref, lse_ref, delta_ref, dq_ref, acc_ref = rest
    b, h, i, n = (pl.program_id(x) for x in range(4))

    @pl.when(n == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(j, masked: bool):
        t = _Tile(p, extras, b, h, i * bq, j * bk, (bq, bk))
        k, v = k_ref[...], v_ref[...]
        if masked and p.kv_len % bk:
            k, v = _zero_rows(k, j * bk, p.kv_len), _zero_rows(v, j * bk, p.kv_len)
        raw = t.raw(q_ref[...], k)
        probs = jnp.exp(t.scores(raw, masked) - finite_or_zero(lse_ref[...]))
        dp = lax.dot_general(do_ref[...], v, pc.NT, preferred_element_type=jnp.float32)
        keep = t.keep()
        if keep is not None:
            dp = jnp.where(keep, dp * (1.0 / (1.0 - p.dropout_p)), 0.0)
        ds = t.vjp(raw, probs * (dp - delta_ref[...]))
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _visit(vis, lists, b, h, i, n, compute)

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * jnp.float32(p.scale)).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, p: Problem, bq: int, bk: int, vis: pc.Visits):
    lists, refs = refs[:3], refs[3:]
    q_ref, k_ref, v_ref, extras, rest = pc.split_refs(p, refs)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = rest
    b, hk, j, g, n = (pl.program_id(x) for x in range(5))
    h = hk * p.groups + g

    @pl.when((g == 0) & (n == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def compute(i, masked: bool):
        t = _Tile(p, extras, b, h, i * bq, j * bk, (bq, bk))
        q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
        if p.q_len % bq:
            q, do, lse, delta = (_zero_rows(x, i * bq, p.q_len) for x in (q, do, lse, delta))
        raw = t.raw(q, k_ref[...])
        probs = jnp.exp(t.scores(raw, masked) - finite_or_zero(lse))
        if p.q_len % bq:  # rows past the end: their mask tile rows are unspecified (NaN)
            probs = jnp.where(t.idx.q < p.q_len, probs, 0.0)
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
        ds = t.vjp(raw, probs * (dp - delta))
        dk_acc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _visit(vis, lists, b, h, j, n, compute)

    @pl.when((g == pl.num_programs(3) - 1) & (n == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * jnp.float32(p.scale)).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _specs(p: Problem, bq: int, bk: int, where):
    """Specs of the inputs (q, k, v, ``_kernel_operands``) and of q-side / kv-side / per-row
    blocks, for a grid where ``where(*grid, *lists) -> (b, query head, q block, k block)``."""
    sq = pl.squeezed

    def spec(shape, index):
        return pl.BlockSpec(shape, lambda *args: index(*where(*args)))

    def q_side(width):
        return spec((sq, sq, bq, width), lambda b, h, i, j: (b, h, i, 0))

    def kv_side(width):
        return spec((sq, sq, bk, width), lambda b, h, i, j: (b, lax.div(h, p.groups), j, 0))

    rows = q_side(1)
    per_row = spec((sq, bq, 1), lambda b, h, i, j: (b if p.bounds > 1 else 0, i, 0)) \
        if p.bounds else None
    seg_rows, seg_cols = (
        spec((sq, bq, 1), lambda b, h, i, j: (b if p.segments > 1 else 0, i, 0)),
        spec((sq, 1, bk), lambda b, h, i, j: (b if p.segments > 1 else 0, 0, j))) \
        if p.segments else (None, None)

    def captured(fn):  # SMEM for the arrays read one element at a time, at (b, h) positions
        return tuple(pl.BlockSpec(memory_space=pltpu.SMEM if scalar else pltpu.VMEM)
                     for scalar in (tile_hooks.scalar_only(fn) if fn else ()))

    mask = None
    if p.has_mask:
        bm, hm, lm, sm = p.mask_shape
        mask = spec((sq, sq, bq if lm > 1 else 1, bk if sm > 1 else 1),
                    lambda b, h, i, j: (b if bm > 1 else 0, h if hm > 1 else 0,
                                        i if lm > 1 else 0, j if sm > 1 else 0))
    extras = Extras(
        mask, pl.BlockSpec(memory_space=pltpu.SMEM) if p.has_dropout else None,
        (per_row, per_row) if p.bounds else (), (seg_rows, seg_cols) if p.segments else (),
        None, captured(p.mask_fn), captured(p.score_fn))
    inputs = [q_side(p.head_dim), kv_side(p.head_dim), kv_side(p.v_head_dim), *extras.flat()]
    return inputs, q_side, kv_side, rows


def _kernel_operands(p: Problem, extras: Extras) -> list:
    """``pc.kernel_operands`` with the per-row arrays as ``(Bm, L, 1)`` and the per-key ones as
    ``(Bm, 1, S)`` (TPU blocks tile the last two dims)."""
    bounds = tuple(x[..., None] for x in extras.bounds)
    segments = () if not extras.segments else (extras.segments[0][..., None],
                                               extras.segments[1][:, None])
    return pc.kernel_operands(p, extras._replace(
        bounds=bounds, segments=segments, mask_consts=_smem_words(p.mask_fn, extras.mask_consts),
        score_consts=_smem_words(p.score_fn, extras.score_consts)))


def _smem_words(fn, consts) -> tuple:
    """``consts`` with those that go to SMEM (``_specs``) widened to 32 bits, its word size
    (``tile_hooks`` reads them back in their own dtype)."""
    if fn is None:
        return consts
    return tuple(c.astype(jnp.float32 if jnp.issubdtype(c.dtype, jnp.floating) else jnp.int32)
                 if scalar and c.dtype.itemsize < 4 else c
                 for c, scalar in zip(consts, tile_hooks.scalar_only(fn)))


def _pallas(kernel, grid, semantics, interpret, name, in_specs, out_specs, scratch_shapes,
            **kwargs):
    return pl.pallas_call(
        kernel, name=name,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch_shapes),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret, **kwargs)


def _row_major(vis: pc.Visits):
    """``where`` of the grid ``(b, h, i, n)``: step n of query block i."""
    def where(b, h, i, n, *lists):
        return b, h, i, _fetched(vis, lists, b, h, i, n)
    return where


_ROW_MAJOR = (_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)


def _forward_call(p: Problem, cfg: Config, vis: pc.Visits, *, interpret):
    bq, bk = cfg.block_q, cfg.block_k
    inputs, q_side, _, rows = _specs(p, bq, bk, _row_major(vis))

    def run(q, k, v, extras, lists):
        out_rows = (p.batch, p.q_heads, p.q_len)
        out, lse = _pallas(
            functools.partial(_fwd_kernel, p=p, bq=bq, bk=bk, vis=vis),
            (p.batch, p.q_heads, cdiv(p.q_len, bq), vis.width), _ROW_MAJOR, interpret,
            "transformax_flash_fwd", inputs, [q_side(p.v_head_dim), rows],
            [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
             pltpu.VMEM((bq, p.v_head_dim), jnp.float32)],
            out_shape=[jax.ShapeDtypeStruct((*out_rows, p.v_head_dim), q.dtype),
                       jax.ShapeDtypeStruct((*out_rows, 1), jnp.float32)],
        )(*lists, q, k, v, *_kernel_operands(p, extras))
        return out, lse[..., 0]
    return run


def _dq_call(p: Problem, cfg: Config, vis: pc.Visits, interpret, q, k, v, extras, lists, dout,
             lse, delta):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    inputs, q_side, _, rows = _specs(p, bq, bk, _row_major(vis))
    return _pallas(
        functools.partial(_dq_kernel, p=p, bq=bq, bk=bk, vis=vis),
        (p.batch, p.q_heads, cdiv(p.q_len, bq), vis.width), _ROW_MAJOR, interpret,
        "transformax_flash_dq", [*inputs, q_side(p.v_head_dim), rows, rows], q_side(p.head_dim),
        [pltpu.VMEM((bq, p.head_dim), jnp.float32)],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(*lists, q, k, v, *_kernel_operands(p, extras), dout, lse, delta)


def _dkdv_call(p: Problem, cfg: Config, vis: pc.Visits, interpret, q, k, v, extras, lists, dout,
               lse, delta):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd

    def where(b, hk, j, g, n, *lists):  # step n of key block j, for query head hk·G + g
        h = hk * p.groups + g
        return b, h, _fetched(vis, lists, b, h, j, n), j

    inputs, q_side, kv_side, rows = _specs(p, bq, bk, where)
    return _pallas(
        functools.partial(_dkdv_kernel, p=p, bq=bq, bk=bk, vis=vis),
        (p.batch, p.kv_heads, cdiv(p.kv_len, bk), p.groups, vis.width),
        (_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY), interpret,
        "transformax_flash_dkdv", [*inputs, q_side(p.v_head_dim), rows, rows],
        [kv_side(p.head_dim), kv_side(p.v_head_dim)],
        [pltpu.VMEM((bk, p.head_dim), jnp.float32), pltpu.VMEM((bk, p.v_head_dim), jnp.float32)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(*lists, q, k, v, *_kernel_operands(p, extras), dout, lse, delta)


def _backward_call(p: Problem, cfg: Config, vis_dq: pc.Visits, vis_dkdv: pc.Visits, *,
                   interpret):
    def run(q, k, v, extras, lists_dq, lists_dkdv, out, lse, dout, dlse):
        delta = row_delta(out, dout, dlse)
        rows = (dout, lse[..., None], delta[..., None])
        dq = _dq_call(p, cfg, vis_dq, interpret, q, k, v, extras, lists_dq, *rows)
        dk, dv = _dkdv_call(p, cfg, vis_dkdv, interpret, q, k, v, extras, lists_dkdv, *rows)
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
    would need scatters Mosaic cannot lower."""
    cfg = config or default_config(problem)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    vis_dq, lists_dq = pc.visits(problem, extras, bq, bk)
    vis_dkdv, lists_dkdv = pc.visits(problem, extras, bq, bk, transpose=True)
    build = functools.partial(_backward_call, problem, cfg, vis_dq, vis_dkdv)
    dq, dk, dv = pc.per_platform(build, q, k, v, extras, lists_dq, lists_dkdv, out, lse, dout,
                                 dlse, interpret=interpret)
    return dq, dk, dv, pc.score_consts_gradients(problem, q, k, v, extras, out, lse, dout, dlse)
