"""Dense layers and embeddings. Weights are stored ``(in, out)`` so ``apply`` is ``x @ w``.

The parameter roles (see :func:`transformax.nn.param_role`): a ``linear_init`` weight ``w`` is a
``WEIGHT`` unless the layer holding it names it a projection (``IN_PROJ``: reads the residual
stream, split by output column under tensor parallelism; ``OUT_PROJ``: writes it, split by input
row); an ``embedding_init`` table is an ``EMBEDDING``; biases and norm scales are ``VECTOR``s.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EMBEDDING, IN_PROJ, OUT_PROJ, WEIGHT, VECTOR = (
    "embedding", "in_proj", "out_proj", "weight", "vector")


def linear_init(key, d_in: int, d_out: int, *, bias: bool = True, std: float = 0.02,
                dtype=jnp.float32) -> dict:
    """``{"w": (d_in, d_out)[, "b": (d_out,)]}``: weight Normal(0, std), bias zeros."""
    params = {"w": jax.nn.initializers.normal(std)(key, (d_in, d_out), dtype)}
    if bias:
        params["b"] = jnp.zeros((d_out,), dtype)
    return params


def linear(params: dict, x: jax.Array) -> jax.Array:
    """``x @ w (+ b)`` over the last axis of ``x``. A quantized ``w`` (``transformax.quant``)
    runs its int8 matmul through ``x @ w``.

    An array ``w`` multiplies ``x`` flattened to 2-D: the weight gradient is then one dot of the
    two row-major operands, which XLA:CPU runs without transposed copies (GPT train step ~20%
    faster there; same values)."""
    w = params["w"]
    if isinstance(w, jax.Array) and w.ndim == 2 and x.ndim > 2:
        rows = math.prod(x.shape[:-1])
        y = (x.reshape(rows, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])
    else:
        y = x @ w
    return y + params["b"] if "b" in params else y


def embedding_init(key, num: int, dim: int, *, std: float = 0.02, dtype=jnp.float32) -> jax.Array:
    """A ``(num, dim)`` table, Normal(0, std)."""
    return jax.nn.initializers.normal(std)(key, (num, dim), dtype)


def embed(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of ``table`` for integer ``ids`` of any shape: ``ids.shape + (dim,)``. A quantized
    table (``transformax.quant``) looks its rows up itself."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
    if hasattr(table, "embed"):
        return table.embed(ids)
    return jnp.take(table, ids, axis=0)


def unembed(table: jax.Array, x: jax.Array) -> jax.Array:
    """Logits against a (tied) embedding table: ``x @ table.T``."""
    return x @ table.T
