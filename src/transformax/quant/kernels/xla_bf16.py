"""Int8 values multiplied as bfloat16 (exact: |q| <= 128) with float32 accumulation, for
hardware whose bf16 matmul is faster than its int8 or float32 one. Int8 activations are exact
in bfloat16; weight-only (float) activations are rounded to it (relative error 2^-9 per value)
and the per-channel scale is applied after the dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.quant.kernels import _int8_dot
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return _int8_dot.reasons_unsupported(problem, activations_="any")


def _dot(xq, wq):
    return jax.lax.dot_general(xq.astype(jnp.bfloat16), wq.astype(jnp.bfloat16),
                               (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    if problem.activations == "none":
        return _dot(x, qw.int8_values()) * qw.scale[0]
    return _int8_dot.matmul(_dot, x, qw)
