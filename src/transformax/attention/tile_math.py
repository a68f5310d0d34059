"""The element math every tiled kernel shares: scores in natural-log units through the
``score_mod`` hook, the mask (causal offset, key intervals, segment ids, a generic ``mask_mod``, a
dense tile), dropout's keep bits, and the backward's corrections.

Functions take a tile of scores and ``Index``: the batch, query head, query and key positions of
its elements as int32 arrays broadcastable to the tile, so each kernel keeps its own layout (the
XLA kernel stacks a key/value head's query heads along the rows; Pallas tiles are 2-D).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformax.attention import tile_hooks
from transformax.attention.problem import Extras, Hoisted, Problem


class Index(NamedTuple):
    """Positions of a tile's elements: batch, query head, query row, key column."""

    b: jax.Array
    h: jax.Array
    q: jax.Array
    kv: jax.Array


def elementwise(fn: Hoisted, args, consts):
    """``fn`` (of scalars, as torch's score_mod/mask_mod) applied to every element of the
    broadcast of ``args``, with ``consts`` passed whole: one ``vmap`` per axis, mapping only the
    arguments that vary along it. Consts that are refs (a Pallas kernel's operands) are read
    by loads at the tile's positions instead (``tile_hooks``: no gathers)."""
    if any(is_ref(c) for c in consts):
        return tile_hooks.evaluate(fn, args, consts)
    args = [jnp.asarray(a) for a in args]
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    args = [a.reshape((1,) * (len(shape) - a.ndim) + a.shape) for a in args]
    keeps = [[a.shape[k] == shape[k] for k in range(len(shape))] for a in args]
    squeezed = [a.reshape([n for n, keep in zip(a.shape, kept) if keep])
                for a, kept in zip(args, keeps)]
    f = fn
    for axis in reversed(range(len(shape))):
        f = jax.vmap(f, in_axes=[0 if kept[axis] else None for kept in keeps]
                     + [None] * len(consts))
    return f(*squeezed, *consts)


def is_ref(x) -> bool:
    """Whether ``x`` is a ref (a Pallas kernel's operand), not an array."""
    return isinstance(getattr(x, "aval", None), jax.ref.AbstractRef)


def _row_lookup(table, idx: Index, length: int):
    """``table[b, q]`` of a ``(Bm, length)`` table at clamped positions."""
    b = idx.b if table.shape[0] > 1 else jnp.zeros_like(idx.b)
    return table[b, jnp.clip(idx.q, 0, length - 1)]


def visible(problem: Problem, extras: Extras, idx: Index, gathered: bool = False):
    """Where the structured mask lets the query see the key (bool, broadcastable to the tile),
    or None where it hides nothing. The dense mask is not included (see ``scores``).
    ``gathered``: ``extras.bounds`` and ``extras.segments`` already hold the tile's own values,
    broadcastable to it (lo, hi, q_ids per row; kv_ids per column), as kernels that cannot
    gather load them."""
    parts = []
    if problem.causal_offset is not None:
        parts.append(idx.kv <= idx.q + problem.causal_offset)
    if problem.bounds is not None:
        lo, hi = extras.bounds if gathered else (
            _row_lookup(x, idx, problem.q_len) for x in extras.bounds)
        parts.append((idx.kv >= lo) & (idx.kv < hi))
    if problem.segments is not None:
        q_ids, kv_ids = extras.segments
        if not gathered:
            b = idx.b if kv_ids.shape[0] > 1 else jnp.zeros_like(idx.b)
            q_ids = _row_lookup(q_ids, idx, problem.q_len)
            kv_ids = kv_ids[b, jnp.clip(idx.kv, 0, problem.kv_len - 1)]
        parts.append(q_ids == kv_ids)
    if problem.mask_fn is not None:
        parts.append(elementwise(problem.mask_fn, idx, extras.mask_consts))
    if not parts:
        return None
    result = parts[0]
    for part in parts[1:]:
        result = result & part
    return result


def score_mod(problem: Problem, extras: Extras, raw, idx: Index):
    """The ``score_mod`` hook on scaled scores ``raw`` (identity without one)."""
    if problem.score_fn is None:
        return raw
    return elementwise(problem.score_fn, (raw, *idx), extras.score_consts).astype(raw.dtype)


def scores(problem: Problem, extras: Extras, raw, idx: Index, dense_tile=None,
           structured: bool = True, gathered: bool = False):
    """Scaled scores ``raw`` (acc dtype) -> the scores the softmax sees: ``score_mod``, then
    ``-inf`` where the mask hides the key. A bool ``dense_tile`` selects, a float one is added.
    ``structured=False`` skips the structured mask (tiles it shows completely); ``gathered``:
    see ``visible``."""
    s = score_mod(problem, extras, raw, idx)
    if dense_tile is not None:
        if problem.mask_is_bool:
            s = jnp.where(dense_tile, s, -jnp.inf)
        else:
            s = s + dense_tile.astype(s.dtype)
    keep = visible(problem, extras, idx, gathered) if structured else None
    return s if keep is None else jnp.where(keep, s, -jnp.inf)


def score_mod_vjp(problem: Problem, extras: Extras, raw, idx: Index, ds):
    """Backward of the hook: ``ds`` (gradient of the modified scores) -> the gradient of the
    raw scores and of the score_mod's differentiable captured arrays (summed over the tile;
    none where they are refs: kernels that read them by loads get them from another pass)."""
    if problem.score_fn is None:
        return ds, ()

    refs = any(is_ref(c) for c in extras.score_consts)

    def hooked(raw, *diff_consts):
        consts = extras.score_consts if refs else with_differentiable(
            problem, extras.score_consts, diff_consts)
        return elementwise(problem.score_fn, (raw, *idx), consts).astype(raw.dtype)

    _, vjp = jax.vjp(hooked, raw, *(() if refs else differentiable_consts(problem, extras)))
    draw, *dconsts = vjp(ds.astype(raw.dtype))
    return draw, tuple(dconsts)


def differentiable_consts(problem: Problem, extras: Extras) -> tuple:
    """The score_mod's captured arrays that get gradients (the floating ones)."""
    if problem.score_fn is None:
        return ()
    return tuple(c for c, d in zip(extras.score_consts, problem.score_fn.differentiable) if d)


def with_differentiable(problem: Problem, consts, differentiable) -> tuple:
    """``consts`` (one per score_mod captured array) with the differentiable ones replaced, in
    order, by ``differentiable``: the inverse of ``differentiable_consts``."""
    it = iter(differentiable)
    flags = problem.score_fn.differentiable if problem.score_fn else ()
    return tuple(next(it) if d else c for c, d in zip(consts, flags))


def finite_or_zero(row_max):
    """The running max with fully masked rows (``-inf``) replaced by 0, so that
    ``exp(s - max)`` gives 0 instead of NaN."""
    return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def row_delta(out, dout, dlse):
    """``rowsum(dout * out) - dlse`` in (at least) f32: the backward pass's per-row correction."""
    acc = jnp.promote_types(out.dtype, jnp.float32)
    return jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a cheap, well-mixing uint32 -> uint32 map."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_keep(seed, dropout_p: float, batch, head, q_heads: int, rows, cols):
    """Counter-based dropout: True where the probability of (batch·Hq + head, row, col) is kept.

    Every kernel computes the same bits from ``seed`` and the element's coordinates, so forward
    and backward, tiled or not, agree exactly. ``seed`` is ``uint32[2]``, or a shard's
    ``uint32[4]`` that also places its local (batch, head) in the whole problem (Hq = ``seed[3]``,
    ``seed[2]`` added), so each shard draws the bits of its global positions.
    """
    batch, head = jnp.asarray(batch, jnp.uint32), jnp.asarray(head, jnp.uint32)
    if len(seed) == 4:
        batch_head = batch * seed[3] + head + seed[2]
    else:
        batch_head = batch * jnp.uint32(q_heads) + head
    row_key = _fmix32(seed[0] ^ _fmix32(batch_head * jnp.uint32(0x9E3779B9)
                                        + rows.astype(jnp.uint32)))
    bits = _fmix32(row_key ^ (cols.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F) + seed[1]))
    threshold = np.uint32(min(round(dropout_p * 2.0**32), 2**32 - 1))
    return bits >= threshold
