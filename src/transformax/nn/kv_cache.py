"""A preallocated key/value cache for incremental decoding, with a write position per row."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Per layer keys and values ``(B, Hkv, max_len, head_dim)``; ``pos (B,)`` int32 counts the
    tokens already in each row (the next token of row ``b`` goes to slot ``pos[b]``)."""

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
    ``pos[b]..``; attention runs over the whole cache (mask: :func:`cache_mask`)."""
    cache = (write(cache[0], k, pos), write(cache[1], v, pos))
    return (*cache, cache)


def roll(cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, pos: jax.Array, *,
         lengths: jax.Array):
    """``(keys, values, cache)`` for a rolling cache of ``W`` slots, position ``p`` in slot
    ``p % W``: attention runs over the ``W`` old slots then the ``T`` new keys (mask:
    :func:`rolling_mask`), and the last ``min(lengths[b], W)`` of the new keys and values of
    row ``b`` (its real tokens) replace the slots of their positions."""
    w, t = cache[0].shape[2], k.shape[2]
    # slot s takes the new token n - W + ((s - pos - n) mod W) when that is >= 0
    src = (lengths[:, None] - w
           + jnp.mod(jnp.arange(w)[None] - pos[:, None] - lengths[:, None], w))
    take = jnp.clip(src, 0, t - 1)[:, None, :, None]

    def rolled(buf, new):
        new = jnp.take_along_axis(new.astype(buf.dtype), take, axis=2)
        return jnp.where((src >= 0)[:, None, :, None], new, buf)

    return (jnp.concatenate([cache[0], k.astype(cache[0].dtype)], axis=2),
            jnp.concatenate([cache[1], v.astype(cache[1].dtype)], axis=2),
            (rolled(cache[0], k), rolled(cache[1], v)))


def rolling_mask(pos: jax.Array, q_len: int, window: int) -> jax.Array:
    """Bool ``(B, 1, q_len, window + q_len)`` for :func:`roll`: query ``i`` of row ``b``
    (position ``pos[b] + i``) sees the keys at positions ``q - window < p <= q`` among the
    ``window`` slots (slot ``s`` holds the latest position ``< pos[b]`` that is ``s`` mod
    ``window``, if any) and the new keys."""
    last = pos[:, None] - 1
    old = last - jnp.mod(last - jnp.arange(window)[None], window)  # -ve: never written
    new = pos[:, None] + jnp.arange(q_len)[None]
    keys = jnp.concatenate([jnp.where(old >= 0, old, -(window + q_len) - 1), new], axis=1)
    q = new[:, :, None]
    return ((keys[:, None, :] <= q) & (keys[:, None, :] > q - window))[:, None]


def cache_mask(pos: jax.Array, q_len: int, max_len: int) -> jax.Array:
    """Bool ``(B, 1, q_len, max_len)``: query ``i`` of row ``b`` (absolute position
    ``pos[b] + i``) may attend to slots ``0 .. pos[b] + i``. Each row is a bottom-right aligned
    causal mask over its own filled prefix; slots not written yet are never visible."""
    q_pos = pos[:, None] + jnp.arange(q_len, dtype=pos.dtype)
    return (jnp.arange(max_len, dtype=pos.dtype) <= q_pos[:, :, None])[:, None]
