"""XLA ``dot_general`` on int8 operands with int32 accumulation, scales applied around it.
On CPU, XLA hands it to YNNPACK (VNNI/AMX int8 kernels where the host has them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.quant.kernels import _int8_dot
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return _int8_dot.reasons_unsupported(problem)


# XLA:CPU rewrites an int8 dot with one row into an int32 matrix-vector product outside
# YNNPACK, 6x slower than f32 (measured, GPT-2-small decode shapes); a few zero rows keep it on
# the int8 path, which is then faster than f32.
MIN_ROWS = 4


def int8_dot(xq, wq):
    """``xq (M, K) @ wq (K, N)`` of int8 operands, int32."""
    m = xq.shape[0]
    if m < MIN_ROWS:
        xq = jnp.pad(xq, ((0, MIN_ROWS - m), (0, 0)))
    return jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)[:m]


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    return _int8_dot.matmul(int8_dot, x, qw)
