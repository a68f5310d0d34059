"""Int8 matmul as a Pallas kernel with the Triton lowering (NVIDIA GPUs, sm80+).

One program per ``(block_m, block_n)`` output tile loops over ``K`` in ``block_k`` steps,
reading the int8 weight tile straight from memory (4x fewer bytes than float32):
- int8 activations (dynamic or static): int8 x int8 -> int32 tensor-core products; the column
  sums of the weight tiles are accumulated alongside when activations have a zero point;
- weight-only: the int8 tile is converted to the activations' dtype in registers, products
  accumulate in float32 (float32 activations in full IEEE float32, not TF32).
The epilogue applies the per-row activation scale (and zero point) and the per-column weight
scale, and stores float32. Ragged edges are masked loads and stores; nothing is padded.

On cpu the kernel runs in Pallas interpret mode where ``TRANSFORMAX_PALLAS_INTERPRET=1`` (tests;
select it with ``quant.kernel``), as the attention Pallas kernels do.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from transformax.attention.backends import pallas_common as pc
from transformax.quant import activations
from transformax.quant.kernels import _int8_dot
from transformax.quant.problem import Problem
from transformax.quant.qweight import QuantizedWeight

# The Triton lowering is used on purpose (portable sm80+, and what interpret mode checks).
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

DTYPES = ("float16", "bfloat16", "float32")
NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes (powers of two, >= 16: Triton's dot) and launch parameters."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def _tile(n: int, cap: int) -> int:
    """The smallest power of two >= ``n`` and >= 16, at most ``cap``."""
    return min(cap, max(16, 1 << (max(n, 1) - 1).bit_length()))


def default_config(problem: Problem) -> Config:
    """A100/H100 tiles shrunk to the problem (decoding's few rows get 16-row tiles)."""
    cfg = Config()
    return dataclasses.replace(cfg, block_m=_tile(problem.m, cfg.block_m),
                               block_n=_tile(problem.n, cfg.block_n),
                               block_k=_tile(problem.k, cfg.block_k))


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    reasons = pc.cpu_reasons(platform)
    if problem.dtype not in DTYPES:
        reasons.append(f"x dtype {problem.dtype} is not supported ({', '.join(DTYPES)})")
    reasons += _int8_dot.weight_reasons(problem)
    capability = pc.cuda_capability() if platform == "cuda" else None
    if capability is not None and capability < (8, 0):
        reasons.append(f"needs an sm80+ GPU for int8 tensor cores (found "
                       f"sm{capability[0]}{capability[1]})")
    return reasons


def _kernel(*refs, m: int, k: int, n: int, cfg: Config, integer: bool, zero: bool):
    x_ref, w_ref, col_ref, *rest = refs
    row_ref = rest.pop(0) if integer else None
    zero_ref = rest.pop(0) if zero else None
    (o_ref,) = rest
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn)
    in_rows, in_cols = rows < m, cols < n

    def step(t, carry):
        acc, colsum = carry
        ks = t * bk + jnp.arange(bk)
        x = plgpu.load(x_ref.at[pl.ds(i * bm, bm), pl.ds(t * bk, bk)],
                       mask=in_rows[:, None] & (ks < k)[None, :], other=0)
        w = plgpu.load(w_ref.at[pl.ds(t * bk, bk), pl.ds(j * bn, bn)],
                       mask=(ks < k)[:, None] & in_cols[None, :], other=0)
        if integer:
            acc += lax.dot_general(x, w, NN, preferred_element_type=jnp.int32)
        else:
            precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
            acc += lax.dot_general(x, w.astype(x.dtype), NN, precision=precision,
                                   preferred_element_type=jnp.float32)
        if zero:
            colsum += jnp.sum(w.astype(jnp.int32), axis=0)
        return acc, colsum

    acc = jnp.zeros((bm, bn), jnp.int32 if integer else jnp.float32)
    acc, colsum = lax.fori_loop(0, pl.cdiv(k, bk), step, (acc, jnp.zeros((bn,), jnp.int32)))
    y = acc.astype(jnp.float32)
    if zero:
        zp = plgpu.load(zero_ref.at[pl.ds(i * bm, bm)], mask=in_rows, other=0)
        y -= zp.astype(jnp.float32)[:, None] * colsum.astype(jnp.float32)[None, :]
    if integer:
        y *= plgpu.load(row_ref.at[pl.ds(i * bm, bm)], mask=in_rows, other=0.0)[:, None]
    y *= plgpu.load(col_ref.at[pl.ds(j * bn, bn)], mask=in_cols, other=0.0)[None, :]
    plgpu.store(o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], y,
                mask=in_rows[:, None] & in_cols[None, :])


def matmul(problem: Problem, x: jax.Array, qw: QuantizedWeight,
           cfg: Config | None = None) -> jax.Array:
    cfg = cfg or default_config(problem)
    m, n = problem.m, problem.n
    integer = problem.activations != "none"
    operands = [x, qw.values, jnp.broadcast_to(qw.scale[0].astype(jnp.float32), (n,))]
    zero = False
    if integer:
        xq, scale, zp = activations.quantize(x, qw)
        operands[0] = xq
        operands.append(jnp.broadcast_to(jnp.reshape(scale, (-1,)), (m,)))
        if zp is not None:
            zero = True
            operands.append(jnp.broadcast_to(jnp.reshape(zp, (-1,)), (m,)).astype(jnp.int32))
    kernel = functools.partial(_kernel, m=m, k=problem.k, n=n, cfg=cfg, integer=integer,
                               zero=zero)

    def build(interpret):
        return pl.pallas_call(
            kernel, grid=(pl.cdiv(m, cfg.block_m), pl.cdiv(n, cfg.block_n)),
            out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
            compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                                 num_stages=cfg.num_stages),
            interpret=interpret, name="transformax_int8_matmul")

    return pc.per_platform(build, *operands)
