"""Feed-forward blocks: GELU MLP (GPT-2, BERT) and SwiGLU (Llama, gate and up in one matmul)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.nn.linear import IN_PROJ, OUT_PROJ, linear, linear_init

ROLES = {"fc": IN_PROJ, "proj": OUT_PROJ, "gate_up": IN_PROJ, "down": OUT_PROJ}  # the *_init linears


def gelu_mlp_init(key, dim: int, hidden: int, *, bias: bool = True, std: float = 0.02,
                  proj_std: float | None = None, dtype=jnp.float32) -> dict:
    """``{"fc": dim -> hidden, "proj": hidden -> dim}``; ``proj_std`` defaults to ``std``."""
    k1, k2 = jax.random.split(key)
    proj_std = std if proj_std is None else proj_std
    return {"fc": linear_init(k1, dim, hidden, bias=bias, std=std, dtype=dtype),
            "proj": linear_init(k2, hidden, dim, bias=bias, std=proj_std, dtype=dtype)}


def gelu_mlp(params: dict, x: jax.Array, *, approximate: bool = True) -> jax.Array:
    """``proj(gelu(fc(x)))``; ``approximate=True`` is GPT-2's tanh GELU, False BERT's erf GELU."""
    return linear(params["proj"], jax.nn.gelu(linear(params["fc"], x), approximate=approximate))


def swiglu_init(key, dim: int, hidden: int, *, bias: bool = False, std: float = 0.02,
                proj_std: float | None = None, dtype=jnp.float32) -> dict:
    """``{"gate_up": dim -> 2*hidden (gate then up), "down": hidden -> dim}``."""
    k1, k2 = jax.random.split(key)
    proj_std = std if proj_std is None else proj_std
    return {"gate_up": linear_init(k1, dim, 2 * hidden, bias=bias, std=std, dtype=dtype),
            "down": linear_init(k2, hidden, dim, bias=bias, std=proj_std, dtype=dtype)}


def swiglu(params: dict, x: jax.Array) -> jax.Array:
    """``down(silu(gate(x)) * up(x))`` with gate and up computed by one matmul."""
    gate, up = jnp.split(linear(params["gate_up"], x), 2, axis=-1)
    return linear(params["down"], jax.nn.silu(gate) * up)
