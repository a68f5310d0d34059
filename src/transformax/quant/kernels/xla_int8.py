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


def _dot(xq, wq):
    return jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    return _int8_dot.matmul(_dot, x, qw)
