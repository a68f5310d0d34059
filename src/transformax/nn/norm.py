"""LayerNorm and RMSNorm; statistics in f32 whatever the input dtype, output in the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm_init(dim: int, *, bias: bool = True, dtype=jnp.float32) -> dict:
    """``{"scale": ones[, "bias": zeros]}`` of shape ``(dim,)``."""
    params = {"scale": jnp.ones((dim,), dtype)}
    if bias:
        params["bias"] = jnp.zeros((dim,), dtype)
    return params


def layer_norm(params: dict, x: jax.Array, *, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis (as ``torch.nn.LayerNorm``, biased variance)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * params["scale"]
    return y + params["bias"] if "bias" in params else y


def rms_norm_init(dim: int, *, dtype=jnp.float32) -> dict:
    """``{"scale": ones(dim)}``."""
    return {"scale": jnp.ones((dim,), dtype)}


def rms_norm(params: dict, x: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis, as Llama: normalise in f32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return y.astype(x.dtype) * params["scale"]
