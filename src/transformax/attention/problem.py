"""The canonical attention problem every kernel receives, and helpers kernels share.

Canonical operands: query ``(B, Hq, L, E)``, key ``(B, Hk, S, E)``, value ``(B, Hk, S, Ev)``
with ``Hq % Hk == 0`` (query head ``h`` reads key/value head ``h // (Hq // Hk)``), an optional
dense mask ``(Bm, Hm, Lm, Sm)`` whose dims are 1 or full, and an optional ``uint32[2]`` dropout
seed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call (hashable: a primitive parameter)."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    dtype: np.dtype
    scale: float
    causal_offset: int | None = None  # key j visible to query i iff j <= i + offset
    mask_dtype: np.dtype | None = None  # bool: True = may attend; float: added to scores
    mask_shape: tuple[int, int, int, int] | None = None
    dropout_p: float = 0.0
    # ((kernel name, 'fwd' | 'bwd'), config) for the planned kernels that have configs.
    kernel_configs: tuple = ()

    def kernel_config(self, kernel: str, pass_: str):
        """The configuration chosen for ``kernel``'s ``pass_`` when this call was planned."""
        return dict(self.kernel_configs).get((kernel, pass_))

    @property
    def acc_dtype(self) -> np.dtype:
        """Scores, softmax statistics and accumulators: f32, or f64 for f64 inputs."""
        return np.dtype(jnp.promote_types(self.dtype, jnp.float32))

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def has_mask(self) -> bool:
        return self.mask_shape is not None

    @property
    def mask_is_bool(self) -> bool:
        return self.mask_dtype == np.dtype(bool)

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    def visible_pairs(self) -> int:
        """(query, key) pairs the causal structure leaves visible, per batch and head."""
        if self.causal_offset is None:
            return self.q_len * self.kv_len
        offset = self.causal_offset
        first = min(max(0, -offset), self.q_len)  # rows before it see no key
        full = min(max(first, self.kv_len - offset - 1), self.q_len)  # rows from it see all
        return sum_range(first, full, offset + 1) + (self.q_len - full) * self.kv_len

    def flops(self) -> tuple[float, float]:
        """Estimated FLOPs of the forward and of forward + backward (2.5x the forward more)."""
        forward = 2.0 * self.batch * self.q_heads * self.visible_pairs() * (
            self.head_dim + self.v_head_dim)
        return forward, 3.5 * forward

    def tile_visibility(self, row0: int, row1: int, col0: int, col1: int) -> str:
        """Causal status of the tile rows [row0, row1) x cols [col0, col1): 'full', 'partial' or
        'none' (dense masks are not considered)."""
        if self.causal_offset is None:
            return "full"
        if col0 > row1 - 1 + self.causal_offset:
            return "none"
        if col1 - 1 <= row0 + self.causal_offset:
            return "full"
        return "partial"


def mask_scores(problem: Problem, scores, rows, cols, mask_tile=None):
    """Applies the causal structure and a dense mask tile to f32 ``scores``.

    ``rows``/``cols`` are int32 index arrays broadcastable to ``scores``; masked entries
    become ``-inf``. A float ``mask_tile`` is added, a bool one selects.
    """
    if mask_tile is not None:
        if problem.mask_is_bool:
            scores = jnp.where(mask_tile, scores, -jnp.inf)
        else:
            scores = scores + mask_tile.astype(scores.dtype)
    if problem.causal_offset is not None:
        scores = jnp.where(cols <= rows + problem.causal_offset, scores, -jnp.inf)
    return scores


def finite_or_zero(row_max):
    """The running max with fully masked rows (``-inf``) replaced by 0, so that
    ``exp(s - max)`` gives 0 instead of NaN."""
    return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def row_delta(out, dout, dlse):
    """``rowsum(dout * out) - dlse`` in (at least) f32: the backward pass's per-row correction."""
    acc = jnp.promote_types(out.dtype, jnp.float32)
    return jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse


def sum_range(start: int, stop: int, shift: int) -> int:
    """sum(i + shift for i in range(start, stop))."""
    return (stop - start) * (start + stop - 1) // 2 + (stop - start) * shift


def cdiv(a: int, b: int) -> int:
    """Ceiling division: the number of ``b``-sized blocks covering ``a``."""
    return -(-a // b)


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a cheap, well-mixing uint32 -> uint32 map."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_keep(seed, dropout_p: float, batch_head, rows, cols):
    """Counter-based dropout: True where the probability of (batch·Hq + head, row, col) is kept.

    Every kernel computes the same bits from ``seed`` (``uint32[2]``) and the element's
    coordinates, so forward and backward, tiled or not, agree exactly.
    """
    row_key = _fmix32(seed[0] ^ _fmix32(jnp.asarray(batch_head, jnp.uint32) * jnp.uint32(0x9E3779B9)
                                        + rows.astype(jnp.uint32)))
    bits = _fmix32(row_key ^ (cols.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F) + seed[1]))
    threshold = np.uint32(min(round(dropout_p * 2.0**32), 2**32 - 1))
    return bits >= threshold
