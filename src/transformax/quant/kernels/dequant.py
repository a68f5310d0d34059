"""The reference: dequantize the weight (and the int8 activations) and multiply in float32.
Runs every recipe on every platform; the only kernel for weight-only and grouped weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.quant import activations
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return []


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    if problem.activations != "none":
        xq, scale, zero = activations.quantize(x, qw)
        x = (xq.astype(jnp.float32) - (0.0 if zero is None else zero)) * scale
    w = qw.dequantize().astype(jnp.float32)
    return jnp.matmul(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
