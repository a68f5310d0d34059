"""Rotary position embeddings (half-split layout, as Hugging Face Llama), with the Llama 3 and
linear frequency scalings."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Frequency scaling. ``kind="linear"``: every frequency divided by ``factor``.
    ``kind="llama3"``: low frequencies divided by ``factor``, high ones kept, smooth in between
    (wavelength thresholds ``original_max_position / {low,high}_freq_factor``)."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"RopeScaling kind={self.kind!r}: expected 'linear' or 'llama3'")


def inverse_frequencies(head_dim: int, theta: float = 10000.0,
                        scaling: RopeScaling | None = None) -> np.ndarray:
    """The ``head_dim // 2`` rotation frequencies, f32 (a NumPy constant: folded under jit)."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    wavelen = 2 * math.pi / inv
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of shape ``positions.shape + (head_dim // 2,)``, f32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x (..., T, H, head_dim)`` by angles ``(..., T, head_dim // 2)``; halves of the
    last axis form the pairs (Hugging Face's ``rotate_half`` convention)."""
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
