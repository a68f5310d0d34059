"""Inverted dropout with an explicit PRNG key."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Zero each element with probability ``rate`` and scale the rest by ``1 / (1 - rate)``.

    ``rate == 0`` returns ``x`` unchanged (no key needed); otherwise ``key`` is required.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    if key is None:
        raise ValueError(f"dropout with rate={rate} needs a PRNG key, got key=None")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
