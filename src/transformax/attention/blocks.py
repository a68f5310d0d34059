"""Block classification, shared by every tiled kernel: for a tiling of the ``(L, S)`` scores
into ``block_q x block_k`` tiles, which tiles the mask hides completely (EMPTY: skipped), shows
completely (FULL: no masking work) or partly (PARTIAL: masked elementwise).

Classes come from each part of the mask (causal offset, key intervals, segment ids, a block
table of a generic mask_mod, a dense mask, the ragged last key block) and combine by minimum:
the parts are a conjunction. A classification may be conservative (PARTIAL where a tile is in
fact EMPTY or FULL), never wrong. Static parts are computed with numpy at trace time.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from transformax.attention.problem import Extras, Problem, cdiv

EMPTY, PARTIAL, FULL = 0, 1, 2


def _xp(*arrays):
    return np if all(isinstance(a, (np.ndarray, np.generic, int)) for a in arrays) else jnp


def _from_any_full(any_visible, full):
    xp = _xp(any_visible, full)
    return xp.where(full, FULL, xp.where(any_visible, PARTIAL, EMPTY)).astype(np.int8)


def _edges(length: int, block: int):
    """Block starts and (clipped) stops, as numpy vectors."""
    starts = np.arange(cdiv(length, block)) * block
    return starts, np.minimum(starts + block, length)


def causal(problem: Problem, block_q: int, block_k: int) -> np.ndarray:
    """Classes of the static causal offset, ``(1, 1, nq, nk)``."""
    r0, r1 = _edges(problem.q_len, block_q)
    c0, c1 = _edges(problem.kv_len, block_k)
    offset = problem.causal_offset
    any_visible = c0[None, :] <= r1[:, None] - 1 + offset
    full = c1[None, :] - 1 <= r0[:, None] + offset
    return _from_any_full(any_visible, full)[None, None]


def _blocked_rows(x, length: int, block: int, fill):
    """``(Bm, length)`` -> ``(Bm, n, block)`` padded with ``fill``."""
    n = cdiv(length, block)
    x = jnp.pad(x, ((0, 0), (0, n * block - length)), constant_values=fill)
    return x.reshape(x.shape[0], n, block)


def intervals(problem: Problem, lo, hi, block_q: int, block_k: int):
    """Classes of per-row key intervals ``[lo, hi)`` (int32 ``(Bm, L)``): ``(Bm, 1, nq, nk)``.
    Padding rows count as neither visible nor hiding."""
    c0, c1 = (x[None, None, None, :] for x in _edges(problem.kv_len, block_k))
    real = _blocked_rows(jnp.ones_like(lo, bool), problem.q_len, block_q, False)[..., None]
    lo = _blocked_rows(lo, problem.q_len, block_q, 0)[..., None]
    hi = _blocked_rows(hi, problem.q_len, block_q, 0)[..., None]
    any_visible = jnp.any(real & (jnp.maximum(lo, c0) < jnp.minimum(hi, c1)), axis=2)
    full = jnp.all(~real | ((lo <= c0) & (hi >= c1)), axis=2)
    return _from_any_full(any_visible, full)[:, None]


def _block_range(ids, length: int, block: int):
    """Per block of ``ids`` ``(Bm, length)``: the min and max id, ``(Bm, n)`` each."""
    info = jnp.iinfo(jnp.int32)
    low = _blocked_rows(ids, length, block, info.max).min(axis=-1)
    high = _blocked_rows(ids, length, block, info.min).max(axis=-1)
    return low, high


def segments(problem: Problem, q_ids, kv_ids, block_q: int, block_k: int):
    """Classes of segment ids (exact for sorted ids, conservative otherwise):
    ``(Bm, 1, nq, nk)``."""
    q_low, q_high = (x[:, :, None] for x in _block_range(q_ids, problem.q_len, block_q))
    k_low, k_high = (x[:, None, :] for x in _block_range(kv_ids, problem.kv_len, block_k))
    any_visible = (q_low <= k_high) & (k_low <= q_high)
    full = (q_low == q_high) & (k_low == k_high) & (q_low == k_low)
    return _from_any_full(any_visible, full)[:, None]


def _reduce_span(x, axis: int, length: int, block: int, table_block: int, reduce):
    """Reduces ``x``'s ``axis`` (blocks of ``table_block``) over the spans of ``block``-sized
    blocks covering ``length``."""
    starts, stops = _edges(length, block)
    first, last = starts // table_block, (stops - 1) // table_block
    width = int((last - first).max()) + 1
    parts = [jnp.take(x, np.minimum(first + t, last), axis=axis) for t in range(width)]
    out = parts[0]
    for part in parts[1:]:
        out = reduce(out, part)
    return out


def reblock(problem: Problem, table, table_blocks, block_q: int, block_k: int):
    """A block table at ``table_blocks`` -> classes for ``block_q x block_k`` tiles."""
    tq, tk = table_blocks
    bounds = []
    for reduce in (jnp.minimum, jnp.maximum):
        x = _reduce_span(table, 2, problem.q_len, block_q, tq, reduce)
        bounds.append(_reduce_span(x, 3, problem.kv_len, block_k, tk, reduce))
    low, high = bounds
    return jnp.where(high == EMPTY, EMPTY, jnp.where(low == FULL, FULL, PARTIAL)).astype(jnp.int8)


def classify(problem: Problem, extras: Extras, block_q: int, block_k: int):
    """Classes of every tile, ``(Bm, Hm, nq, nk)`` int8 (Bm, Hm: 1 or the batch / query heads).
    numpy where only static parts are present."""
    nq, nk = cdiv(problem.q_len, block_q), cdiv(problem.kv_len, block_k)
    base = np.full((1, 1, nq, nk), PARTIAL if problem.has_mask else FULL, np.int8)
    if problem.kv_len % block_k:
        base[..., -1] = PARTIAL  # bounds masking of the ragged last key block
    parts = [base]
    if problem.causal_offset is not None:
        parts.append(causal(problem, block_q, block_k))
    if problem.bounds is not None:
        parts.append(intervals(problem, *extras.bounds, block_q, block_k))
    if problem.segments is not None:
        parts.append(segments(problem, *extras.segments, block_q, block_k))
    if problem.mask_fn is not None:
        parts.append(np.full((1, 1, nq, nk), PARTIAL, np.int8) if problem.table_blocks is None
                     else reblock(problem, extras.table, problem.table_blocks, block_q, block_k))
    out = parts[0]
    for part in parts[1:]:
        out = _xp(out, part).minimum(out, part)
    return out


def union(classes):
    """Classes of ``(Bm, Hm, nq, nk)`` merged over batch and heads -> ``(nq, nk)``: EMPTY only
    where EMPTY for all, FULL only where FULL for all."""
    xp = _xp(classes)
    low, high = classes.min(axis=(0, 1)), classes.max(axis=(0, 1))
    return xp.where(high == EMPTY, EMPTY, xp.where(low == FULL, FULL, PARTIAL)).astype(np.int8)


def lists(classes2d, cls: int):
    """For each row of ``(n, m)`` classes: the count of columns of class ``cls`` and the column
    indices with those first (ascending): ``(n,)`` and ``(n, m)`` int32."""
    xp = _xp(classes2d)
    hit = classes2d == cls
    order = xp.argsort(~hit, axis=-1, stable=True).astype(np.int32)
    return hit.sum(axis=-1).astype(np.int32), order


def materialise(problem: Problem, extras: Extras | None, limit: int, check_only: bool = False):
    """For kernels without a ``mask_fn`` path: the generic mask evaluated as a dense bool mask
    (batch / head dims of 1 where it does not read ``b`` / ``h``) and each row's hull ``[first
    visible key, last + 1)`` intersected into the key intervals, so interval-aware kernels still
    skip the hidden tiles. Returns ``(exact, hull, convex)``: ``(problem, extras)`` pairs
    without the ``mask_fn``, with the dense mask and the hull or the hull alone, and whether the
    hull is exact (every row's visible keys contiguous: causal, windows, prefixes): a Python
    bool for a mask_mod that captures no arrays (a function of the indices alone, e.g. torch's
    causal mask_mod: evaluated once, when traced), else a traced one. None where the dense mask
    would exceed ``limit`` elements (``check_only``: True where it would not)."""
    p = problem
    fn, depends = p.mask_fn, p.mask_fn.depends
    batch, heads = (p.batch if depends[0] else 1), (p.q_heads if depends[1] else 1)
    if batch * heads * p.q_len * p.kv_len > limit:
        return None
    if check_only:
        return True
    static = not extras.mask_consts

    def dense_mask():
        return evaluate(lambda b, h, q, kv: fn(b, h, q, kv, *extras.mask_consts), batch, heads,
                        p.q_len, p.kv_len)

    with jax.ensure_compile_time_eval() if static else contextlib.nullcontext():
        dense = dense_mask()
        lo, hi, convex = row_hull(dense)
    if static:
        convex = bool(convex)
        if not convex:  # evaluated again where it runs, not embedded as a constant
            dense = dense_mask()
    if extras.bounds:
        lo, hi = jnp.maximum(lo, extras.bounds[0]), jnp.minimum(hi, extras.bounds[1])
    hull = (dataclasses.replace(p, mask_fn=None, table_blocks=None, bounds=lo.shape[0]),
            extras._replace(bounds=(lo, hi), table=None, mask_consts=()))
    exact = (dataclasses.replace(hull[0], mask_dtype=np.dtype(bool), mask_shape=dense.shape),
             hull[1]._replace(mask=dense))
    return exact, hull, convex


def evaluate(mask_mod, batch: int, heads: int, q_len: int, kv_len: int, q0=0, kv0=0):
    """``mask_mod`` (a function of scalar indices, as in torch) on every ``(b, h, q, kv)``:
    a bool ``(batch, heads, q_len, kv_len)`` array; rows from ``q0``, columns from ``kv0``."""
    over_kv = jax.vmap(mask_mod, (None, None, None, 0))
    over_q = jax.vmap(over_kv, (None, None, 0, None))
    over_h = jax.vmap(over_q, (None, 0, None, None))
    over_b = jax.vmap(over_h, (0, None, None, None))
    out = over_b(jnp.arange(batch, dtype=jnp.int32), jnp.arange(heads, dtype=jnp.int32),
                 q0 + jnp.arange(q_len, dtype=jnp.int32),
                 kv0 + jnp.arange(kv_len, dtype=jnp.int32))
    return jnp.broadcast_to(out, (batch, heads, q_len, kv_len)).astype(bool)


def row_hull(dense):
    """Each row's hull ``[first visible key, last + 1)`` of a bool ``(batch, heads, L, S)`` mask,
    as the union over heads, ``(batch, L)`` int32 each (``[0, 0)`` for rows seeing nothing), and
    whether every row of every head sees exactly its hull (a bool scalar)."""
    kv_len = dense.shape[-1]
    cols = jnp.arange(kv_len, dtype=jnp.int32)
    rows = dense.any(axis=1)
    lo = jnp.min(jnp.where(rows, cols, kv_len), axis=-1)
    hi = jnp.max(jnp.where(rows, cols + 1, 0), axis=-1)
    lo = jnp.minimum(lo, hi)
    return lo, hi, jnp.all(dense.sum(axis=-1, dtype=jnp.int32) == (hi - lo)[:, None])


def table(mask_mod, batch: int, heads: int, q_len: int, kv_len: int, block_q: int,
          block_k: int):
    """``mask_mod`` (a function of scalar indices) analysed exactly one query block at a time:
    the classes of its ``block_q x block_k`` tiles, ``(batch, heads, nq, nk)`` int8, and its
    rows' ``row_hull`` (``lo``, ``hi`` ``(batch, q_len)``, and whether they are exact)."""
    nq, nk = cdiv(q_len, block_q), cdiv(kv_len, block_k)

    def one_row(i):
        rows = jnp.arange(block_q, dtype=jnp.int32) + i * block_q
        dense = evaluate(mask_mod, batch, heads, block_q, nk * block_k, q0=i * block_q)
        inside = (rows[:, None] < q_len) & (jnp.arange(nk * block_k)[None, :] < kv_len)
        dense = dense & inside
        tiles = dense.reshape(batch, heads, block_q, nk, block_k)
        inside = inside.reshape(block_q, nk, block_k)
        any_visible = jnp.any(tiles, axis=(2, 4))
        full = jnp.all(tiles | ~inside, axis=(2, 4))
        return (_from_any_full(any_visible, full), *row_hull(dense))

    classes, lo, hi, exact = jax.lax.map(one_row, jnp.arange(nq))
    rows = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, nq * block_q)[:, :q_len]
    return jnp.moveaxis(classes, 0, 2), rows(lo), rows(hi), jnp.all(exact)
