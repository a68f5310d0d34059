"""Native packed-int4 weight-only matmul for few rows on x86 CPUs (decoding): the
``tfx_cpu_int4`` handler of ``cpu_int8``'s extension (``csrc/int8_matmul.cc``), with its AVX2
and AVX-512 code paths and its FFI call.

It reads the packed ``(K / 2, N)`` weight (two input rows a byte) and the ``(groups, N)`` scales
directly: each byte is widened in registers, its nibbles sign-extended by shifts and converted
to float32 (FMA with the float32 activations), each group's sums scaled as they are added; no
unpacked or float copy of the weight is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.quant.kernels import cpu_int8
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    reasons = cpu_int8.EXTENSION.reasons_unsupported(("avx2", "avx512"))
    if problem.bits != 4:
        reasons.append("int8 weights: a kernel for packed int4 ones (cpu_int8 takes int8)")
    if problem.activations != "none":
        reasons.append("int8 activations: a weight-only kernel")
    reasons += cpu_int8.row_reasons(problem)
    return reasons


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    scale = jnp.broadcast_to(qw.scale.astype(jnp.float32), (problem.groups, problem.n))
    return cpu_int8._native("tfx_cpu_int4", jnp.float32, x.astype(jnp.float32), qw.values, scale)
