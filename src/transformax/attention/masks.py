"""Structured attention masks: described by a few integers, never materialised by kernels
that can compute them tile by tile."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CausalMask:
    """Query ``i`` may attend to key ``j`` iff ``j <= i + offset``.

    ``offset == 0`` is torch's ``is_causal`` (top-left); ``offset == S - L`` aligns the last
    query with the last key (bottom-right, as when decoding with a KV cache).
    """

    q_len: int
    kv_len: int
    offset: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_len, self.kv_len)

    def to_dense(self) -> jax.Array:
        """The mask as a bool ``(L, S)`` array (True = may attend)."""
        rows = jnp.arange(self.q_len)[:, None]
        cols = jnp.arange(self.kv_len)[None, :]
        return cols <= rows + self.offset


def causal_upper_left(q_len: int, kv_len: int) -> CausalMask:
    """Causal mask aligned top-left, the same as ``is_causal=True``: ``tril(ones(L, S))``."""
    return CausalMask(int(q_len), int(kv_len), 0)


def causal_lower_right(q_len: int, kv_len: int) -> CausalMask:
    """Causal mask aligned bottom-right, ``tril(ones(L, S), S - L)``: for decoding with a cache."""
    return CausalMask(int(q_len), int(kv_len), int(kv_len) - int(q_len))
