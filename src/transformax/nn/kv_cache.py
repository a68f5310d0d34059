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


def cache_mask(pos: jax.Array, q_len: int, max_len: int) -> jax.Array:
    """Bool ``(B, 1, q_len, max_len)``: query ``i`` of row ``b`` (absolute position
    ``pos[b] + i``) may attend to slots ``0 .. pos[b] + i``. Each row is a bottom-right aligned
    causal mask over its own filled prefix; slots not written yet are never visible."""
    q_pos = pos[:, None] + jnp.arange(q_len, dtype=pos.dtype)
    return (jnp.arange(max_len, dtype=pos.dtype) <= q_pos[:, :, None])[:, None]
