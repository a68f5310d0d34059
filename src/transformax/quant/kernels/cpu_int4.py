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


# Rows m, scale groups g, a group's inputs k (packed: p), outputs n: x (M, G, K / G) and the
# packed weight (G, K / 2G, N) split by group, each device's partial products summed; a group
# ending mid-byte (odd K / G) cannot split, so then the packed inputs stay whole.
_GROUP_FACTORS = (("mgk", "gpn", "gn"), "mn", "g", "kp")
_WHOLE_FACTORS = (("mk", "pn", "gn"), "mn", "", "kpg")


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    g, n = problem.groups, problem.n
    scale = jnp.broadcast_to(qw.scale.astype(jnp.float32), (g, n))
    x, w, factors = x.astype(jnp.float32), qw.values, _WHOLE_FACTORS
    if (problem.k // g) % 2 == 0:
        rows = problem.k // g
        x, w = x.reshape(x.shape[0], g, rows), w.reshape(g, rows // 2, n)
        factors = _GROUP_FACTORS
    return cpu_int8.native_call("tfx_cpu_int4", jnp.float32, factors, x, w, scale)
