"""Initialisation: weights are Normal(0, std) (``jax.nn.initializers.normal``, what every
``*_init`` here uses), and GPT-2 shrinks the projections that write to the residual stream."""

from __future__ import annotations

import math


def residual_std(std: float, n_layer: int) -> float:
    """GPT-2's std for the output projections of attention and MLP: ``std / sqrt(2 n_layer)``
    (two residual additions per layer keep the stream's variance from growing with depth)."""
    return std / math.sqrt(2 * n_layer)
