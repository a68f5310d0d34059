"""Native int8 matmul for few rows on x86 CPUs (decoding's matrix-vector products): C++
(``csrc/int8_matmul.cc``) behind XLA's FFI, one build with AVX2 and AVX-512 code paths picked per
call from the host's ISA (``host.current().isa``, which ``--xla_cpu_max_isa`` and
``TRANSFORMAX_CPU_ISA`` lower, so an emulated AVX2 host runs the AVX2 code).

It reads the int8 weight once per few rows in its stored ``(K, N)`` layout, never a float copy:
weight-only products widen it to float32 in registers (FMA, per-channel scales after the sum);
int8 activations multiply it as integers (AVX-512 VNNI ``vpdpbusd``, or AVX2 ``vpmaddubsw`` /
``vpmaddwd``), exact int32 sums rescaled as ``xla_int8``'s. Under ``vmap`` the batch is folded
into the rows (one call per member where the weight itself is batched).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformax import host, native, partitioning
from transformax.quant.kernels import _int8_dot
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight

EXTENSION = native.load("_int8_cpu", {"tfx_cpu_int8_f32": "matmul_f32",
                                      "tfx_cpu_int8_s8": "matmul_s8",
                                      "tfx_cpu_int4": "matmul_i4"})  # cpu_int4's

_ISA_CODES = {"avx2": 0, "avx512": 1, "avx512_vnni": 2}


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return (EXTENSION.reasons_unsupported(("avx2", "avx512")) + row_reasons(problem)
            + _int8_dot.weight_reasons(problem))


# The most rows the native kernels (cpu_int8, cpu_int4) take: their time grows with the rows
# (each row tile widens the weight again), so far beyond their crossovers they cannot win.
MAX_ROWS = 128

# Rows up to which a native kernel beat every XLA kernel, per host ISA and product: the
# unmeasured default (the tuning cache or autotuning decide per shape). Measured on Sapphire
# Rapids, 2 cores, emulated AVX2 too (`scripts/bench_quant.py --bench rows`, Linear(1024 -> 4096)
# and (768 -> 3072), native / best XLA time): weight-only AVX-512 0.64-0.69 at 8 rows (768) and
# 4 (1024), 1.06-1.12 at 12; AVX2 0.79-0.86 at 2-4, 1.05-1.19 at 4-8; int8 activations AVX-512
# 0.92-0.94 at 2, 1.09-1.34 at 4; AVX2 0.84-0.96 at 1, 1.17-1.26 at 2; int4 AVX-512 0.81-0.86
# at 64, 1.03-1.20 at 128; AVX2 0.76-0.82 at 16, 1.06-1.07 at 32.
ROW_LIMITS = {"avx512": {"weight-only": 8, "int8 activations": 2, "int4": 64},
              "avx2": {"weight-only": 4, "int8 activations": 1, "int4": 16}}


def row_reasons(problem: Problem) -> list[str]:
    """Why the native kernels do not take ``problem``'s rows."""
    if problem.m > MAX_ROWS:
        return [f"{problem.m} rows: a kernel for at most {MAX_ROWS} (decoding's few rows; its "
                f"time grows with the rows)"]
    return []


def row_limit(problem: Problem) -> tuple[int, str]:
    """The rows up to which a native kernel runs ``problem`` unless measured otherwise, and
    where that number comes from."""
    product = ("int4" if problem.bits == 4 else
               "weight-only" if problem.activations == "none" else "int8 activations")
    machine_isa = host.current().isa
    limit = ROW_LIMITS.get(machine_isa, {}).get(product, 0)
    return limit, f"for {product} on {machine_isa} hosts (measured crossover)"


def isa(integer: bool) -> str:
    """The code path: the host's ISA, 'avx512_vnni' for int8 activations where it has VNNI."""
    h = host.current()
    return "avx512_vnni" if integer and h.isa == "avx512" and "avx512_vnni" in h.isa_flags \
        else h.isa


def native_call(target: str, dtype, factors: tuple, x: jax.Array, w: jax.Array,
                *rest: jax.Array) -> jax.Array:
    """The FFI call ``target`` on ``x (M, ...)`` and ``w (..., N)`` (and the scale), flattened to
    ``(M, K)`` and ``(K', N)`` for the call, giving ``(M, N)`` of ``dtype``. ``factors``: the
    operands' and the result's factors (a letter per dim) and the summed and whole ones, for
    ``partitioning.factorwise``, by which each device runs the call on its shard under a
    multi-device ``jit``. Vmapped, the batch joins the rows."""

    def ffi(x, w, *rest):
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        w = w.reshape(math.prod(w.shape[:-1]), w.shape[-1])
        out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), dtype)
        return jax.ffi.ffi_call(target, out)(
            x, w, *rest, isa=np.int64(_ISA_CODES[isa(target.endswith("s8"))]),
            threads=np.int64(host.current().cores))

    @jax.custom_batching.custom_vmap
    def call(x, w, *rest):
        if partitioning.left_to_partitioner(x, w, *rest):  # on each device's shard
            return partitioning.factorwise(ffi, *factors)(x, w, *rest)
        return ffi(x, w, *rest)

    @call.def_vmap
    def rule(axis_size, in_batched, x, w, *rest):
        if any(in_batched[1:]):  # a batched weight: one call per member
            args = (x, w, *rest)
            return jax.lax.map(lambda i: call(*(a[i] if b else a for a, b in
                                                zip(args, in_batched))),
                               jnp.arange(axis_size)), True
        x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size, *x.shape))
        rows = call(x.reshape(axis_size * x.shape[1], *x.shape[2:]), w, *rest)
        return rows.reshape(axis_size, x.shape[1], rows.shape[-1]), True

    return call(x, w, *rest)


# Rows m, inputs k, outputs n: a split k sums the partial products.
_F32_FACTORS = (("mk", "kn", "n"), "mn", "k")
_S8_FACTORS = (("mk", "kn"), "mn", "k")


def _dot(xq: jax.Array, wq: jax.Array) -> jax.Array:
    return native_call("tfx_cpu_int8_s8", jnp.int32, _S8_FACTORS, xq, wq)


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    if problem.activations != "none":
        return _int8_dot.matmul(_dot, x, qw)
    scale = jnp.broadcast_to(qw.scale[0].astype(jnp.float32), (problem.n,))
    return native_call("tfx_cpu_int8_f32", jnp.float32, _F32_FACTORS, x.astype(jnp.float32),
                       qw.values, scale)
