"""Int8 activations: quantized per token or per tensor (dynamic) or with calibrated scales
(static), symmetric or with a zero point, and the rescaling of an integer product."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.quant.qweight import INT8_MAX, QuantizedWeight


def scale_and_zero(lo: jax.Array, hi: jax.Array, symmetric: bool):
    """Scale (and int32 zero point, None when symmetric) mapping ``[lo, hi]`` onto int8:
    ``[-127, 127]`` symmetric, ``[-128, 127]`` with a zero point (0 stays exact)."""
    if symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return jnp.where(amax > 0, amax / INT8_MAX, 1.0), None
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0)
    zero = jnp.clip(jnp.round(-128.0 - lo / scale), -128, 127).astype(jnp.int32)
    return scale, zero


def quantize(x: jax.Array, qw: QuantizedWeight):
    """``(xq int8, scale, zero)`` for ``(M, K)`` activations, so ``x ~ scale * (xq - zero)``;
    ``scale``/``zero`` are ``(M, 1)`` per token, scalars per tensor; ``zero`` is None when
    symmetric."""
    x = x.astype(jnp.float32)
    if qw.activations == "static":
        scale, zero = qw.act_scale.astype(jnp.float32), qw.act_zero
    else:
        axis = -1 if qw.act_granularity == "token" else None
        scale, zero = scale_and_zero(jnp.min(x, axis=axis, keepdims=True),
                                     jnp.max(x, axis=axis, keepdims=True), qw.act_symmetric)
    low = -INT8_MAX if zero is None else -128
    q = jnp.round(x / scale) + (0 if zero is None else zero)
    return jnp.clip(q, low, INT8_MAX).astype(jnp.int8), scale, zero


def rescale(acc: jax.Array, scale: jax.Array, zero: jax.Array | None,
            qw: QuantizedWeight) -> jax.Array:
    """``sum_k (xq - zero) w_q`` times the activation and weight scales, in float32, from the
    integer product ``acc = xq @ w_q`` (``(M, N)``, per-channel or per-tensor weights)."""
    acc = acc.astype(jnp.float32)
    if zero is not None:
        colsum = jnp.sum(qw.values, axis=0, dtype=jnp.int32)
        acc = acc - zero.astype(jnp.float32) * colsum.astype(jnp.float32)
    return acc * (scale * qw.scale[0])
