"""A preallocated key/value cache for incremental decoding, with a write position per row."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from transformax import attention


class KVCache(NamedTuple):
    """Per layer keys and values ``(B, Hkv, max_len, head_dim)``; ``pos (B,)`` int32 counts the
    tokens already in each row (the next token of row ``b`` goes to slot ``pos[b]``, or
    ``pos[b] % max_len`` in a rolling cache, see :func:`roll`)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


def init_cache(n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
    """An empty cache (zeros, ``pos == 0``)."""
    shape = (batch, n_kv_head, max_len, head_dim)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(n_layer)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(n_layer)),
                   jnp.zeros((batch,), jnp.int32))


def write(buf: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """``buf (B, H, S, E)`` with ``new (B, H, T, E)`` written at slots ``pos[b] .. pos[b]+T-1``."""
    return jax.vmap(lambda b, n, p: jax.lax.dynamic_update_slice_in_dim(b, n, p, axis=1))(
        buf, new.astype(buf.dtype), pos)


def append(cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, pos: jax.Array):
    """``(keys, values, cache)``: ``k``, ``v (B, Hkv, T, E)`` written into ``cache`` at slots
    ``pos[b]..``; attention runs over the whole cache (mask: ``tfx.band(T, max_len, left=None,
    right=0, offset=pos)``)."""
    cache = (write(cache[0], k, pos), write(cache[1], v, pos))
    return (*cache, cache)


def roll(cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, pos: jax.Array, *,
         lengths: jax.Array):
    """``(keys, values, cache)`` for a rolling cache of ``W`` slots, position ``p`` in slot
    ``p % W``: attention runs over the ``W`` slots in position order (positions
    ``pos[b] - W ..``) then the ``T`` new keys (mask: :func:`rolling_mask`), and the last
    ``min(lengths[b], W)`` of the new keys and values of row ``b`` (its real tokens) replace
    the slots of their positions."""
    w, t = cache[0].shape[2], k.shape[2]
    in_order = jnp.mod(pos[:, None] + jnp.arange(w)[None], w)[:, None, :, None]
    # slot s takes the new token n - W + ((s - pos - n) mod W) when that is >= 0
    src = (lengths[:, None] - w
           + jnp.mod(jnp.arange(w)[None] - pos[:, None] - lengths[:, None], w))
    take = jnp.clip(src, 0, t - 1)[:, None, :, None]

    def attended(buf, new):
        return jnp.concatenate([jnp.take_along_axis(buf, in_order, axis=2),
                                new.astype(buf.dtype)], axis=2)

    def rolled(buf, new):
        new = jnp.take_along_axis(new.astype(buf.dtype), take, axis=2)
        return jnp.where((src >= 0)[:, None, :, None], new, buf)

    return (attended(cache[0], k), attended(cache[1], v),
            (rolled(cache[0], k), rolled(cache[1], v)))


def rolling_mask(pos: jax.Array, q_len: int, window: int) -> attention.Mask:
    """The structured mask for :func:`roll`'s ``window + q_len`` keys (positions
    ``pos[b] - window + j``): query ``i`` (position ``pos[b] + i``) sees keys ``i + 1 .. i +
    window``, those of negative position (never written) hidden."""
    written = jnp.arange(window + q_len)[None] >= window - pos[:, None]
    return (attention.band(q_len, window + q_len, left=window - 1, right=0, offset=window)
            & attention.key_padding(written))
