"""Multi-head self-attention (MHA/GQA): one fused qkv matmul, optional RoPE, ``tfx.sdpa`` (or
``tfx.flex_attention`` with a ``score_mod``) in ``(B, H, T, head_dim)`` layout, optional KV
cache, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax import attention
from transformax.nn import kv_cache
from transformax.nn.linear import IN_PROJ, OUT_PROJ, linear, linear_init
from transformax.nn.rope import apply_rope


ROLES = {"qkv": IN_PROJ, "out": OUT_PROJ}  # attention_init's linears


def softcap(cap: float):
    """Gemma 2's attention-logit soft-capping as a ``score_mod``: ``cap * tanh(score / cap)``."""
    def score_mod(score, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        return cap * jnp.tanh(score / cap)

    return score_mod


def attention_init(key, dim: int, n_head: int, n_kv_head: int, head_dim: int, *,
                   bias: bool = True, std: float = 0.02, proj_std: float | None = None,
                   dtype=jnp.float32) -> dict:
    """``{"qkv": dim -> (n_head + 2 n_kv_head) head_dim, "out": n_head head_dim -> dim}``;
    the qkv columns are all query heads, then key heads, then value heads."""
    k1, k2 = jax.random.split(key)
    return {"qkv": linear_init(k1, dim, (n_head + 2 * n_kv_head) * head_dim, bias=bias, std=std,
                               dtype=dtype),
            "out": linear_init(k2, n_head * head_dim, dim, bias=bias,
                               std=std if proj_std is None else proj_std, dtype=dtype)}


def self_attention(params: dict, x: jax.Array, *, n_head: int, n_kv_head: int,
                   rope: tuple[jax.Array, jax.Array] | None = None, mask=None,
                   is_causal: bool = False, cache: tuple[jax.Array, jax.Array] | None = None,
                   cache_pos: jax.Array | None = None, cache_update=kv_cache.append,
                   score_mod=None, dropout_rate: float = 0.0,
                   dropout_rng: jax.Array | None = None):
    """Attention of ``x (B, T, dim)`` over itself, or over ``cache`` (this layer's keys and
    values ``(B, Hkv, S, head_dim)``) into which ``cache_update(cache, k, v, cache_pos)``
    puts ``x``'s keys and values (:func:`~transformax.nn.kv_cache.append`: written at
    ``cache_pos``; :func:`~transformax.nn.kv_cache.roll`: a rolling window).

    ``rope``: ``(cos, sin)`` of shape ``([B,] T, head_dim // 2)``; ``mask`` and ``is_causal`` go
    to ``sdpa`` as ``attn_mask`` / ``is_causal``; ``score_mod(score, b, h, q_idx, kv_idx)``
    (e.g. soft-capping) runs ``flex_attention`` instead, which has no dropout. Returns
    ``(y (B, T, dim), cache)`` with the updated cache (``None`` without one).
    """
    b, t, _ = x.shape
    qkv = linear(params["qkv"], x)
    head_dim = qkv.shape[-1] // (n_head + 2 * n_kv_head)
    q, k, v = jnp.split(qkv, [n_head * head_dim, (n_head + n_kv_head) * head_dim], axis=-1)
    q = q.reshape(b, t, n_head, head_dim)
    k = k.reshape(b, t, n_kv_head, head_dim)
    v = v.reshape(b, t, n_kv_head, head_dim)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    if cache is not None:
        k, v, cache = cache_update(cache, k, v, cache_pos)
    gqa = n_head != n_kv_head
    if score_mod is None:
        y = attention.sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa,
                           dropout_p=dropout_rate, dropout_rng=dropout_rng)
    elif dropout_rate:
        raise ValueError(f"a score_mod (flex_attention) has no attention dropout; got "
                         f"dropout_rate={dropout_rate}")
    else:
        if is_causal:
            mask = attention.causal_upper_left(q.shape[2], k.shape[2])
        y = attention.flex_attention(q, k, v, score_mod=score_mod, block_mask=mask,
                                     enable_gqa=gqa)
    return linear(params["out"], y.swapaxes(1, 2).reshape(b, t, n_head * head_dim)), cache
