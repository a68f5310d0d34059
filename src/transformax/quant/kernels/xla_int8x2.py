"""Weight-only int8 on the int8 ``dot_general``: float activations written as two int8 digits
per token, ``x ~ s * (hi + lo / 254)`` with ``s`` the token's ``max |x| / 127`` (error at most
``s / 508``, 2^-16 of the token's largest value: float32-like for the product), both digit rows
multiplied by the int8 weight in one dot of ``2M`` rows. While the weight's read dominates (up
to a few hundred rows on CPU) that costs about one int8 dot, well under a float32 one. Grouped
weights (int8 or unpacked int4) are one batched dot per group of input rows, each group's
products scaled before they are summed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.quant.kernels import _int8_dot, xla_int8
from transformax.quant.problem import Problem
from transformax.quant.qweight import INT8_MAX, QuantizedWeight

LO = 2 * INT8_MAX  # |r - round(r)| <= 1/2, so the low digit round((r - hi) * 254) fits int8


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return _int8_dot.reasons_unsupported(problem, activations_="float")


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    x = x.astype(jnp.float32)
    m = x.shape[0]
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    r = x / scale
    hi = jnp.round(r)
    digits = jnp.concatenate([hi, jnp.round((r - hi) * LO)]).astype(jnp.int8)
    values, g = qw.int8_values(), qw.groups
    if g == 1:
        acc = xla_int8.int8_dot(digits, values).astype(jnp.float32) * qw.scale[0]
    else:
        rows = max(2 * m, xla_int8.MIN_ROWS)  # as in int8_dot
        digits = jnp.pad(digits, ((0, rows - 2 * m), (0, 0)))
        per_group = jax.lax.dot_general(
            digits.reshape(rows, g, -1), values.reshape(g, -1, values.shape[-1]),
            (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # (g, rows, N)
        acc = jnp.sum(per_group.astype(jnp.float32) * qw.scale[:, None, :], axis=0)[:2 * m]
    return (acc[:m] + acc[m:] / LO) * scale
