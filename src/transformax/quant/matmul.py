"""``x @ qw`` for a quantized weight: canonicalise, select a kernel per platform, run it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.attention.primitive import current_platform
from transformax.quant import select
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight


def _flatten(x, qw: QuantizedWeight) -> jax.Array:
    """``x (..., K)`` as ``(M, K)``, checked against the weight."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantized linear {qw.name!r}: x must be floating point, got dtype "
                        f"{x.dtype}")
    if x.ndim < 1 or x.shape[-1] != qw.shape[0]:
        raise ValueError(f"quantized linear {qw.name!r}: x has shape {x.shape}, its last axis "
                         f"must match the weight's {qw.shape[0]} input features (weight "
                         f"shape {qw.shape})")
    return x.reshape(-1, qw.shape[0])


def matmul(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """``x @ w`` for ``x (..., K)`` and the quantized ``(K, N)`` weight, in ``x``'s dtype, by
    the kernel the selector picks for the default backend's platform (see ``quant.explain``).
    """
    x2 = _flatten(x, qw)
    problem = Problem.of(x2, qw)
    platform = current_platform()
    chosen = select.plan(problem)[platform]
    if chosen is None:
        raise select.no_kernel_error(problem, platform)
    y = select.module(chosen).matmul(problem, x2, qw)
    return y.astype(x2.dtype).reshape(*jnp.shape(x)[:-1], qw.shape[1])


def explain(x: jax.Array, qw: QuantizedWeight) -> select.Explanation:
    """Which kernel ``x @ qw`` runs on each platform, and why each other one does not."""
    return select.explanation(Problem.of(_flatten(x, qw), qw))
