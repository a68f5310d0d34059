"""Checks and helpers the model modules share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformax.attention import causal_upper_left
from transformax.nn import kv_cache


def num_params(params) -> int:
    """Number of scalars in a parameter pytree (a tied embedding counts once)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def check_tokens(tokens: jax.Array, max_len: int, max_len_name: str) -> None:
    """``tokens`` must be integer ``(B, T)`` with ``T <= max_len``."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer (B, T) array, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"tokens has length {tokens.shape[1]}, more than the model's "
                         f"{max_len_name}={max_len}")


def check_token_ids(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Raise naming the first id of concrete ``tokens`` outside ``[0, vocab_size)``. Traced
    ``tokens`` (inside ``jit``) are not checked: there an id ``>= vocab_size`` embeds as NaN
    and a negative one wraps round (JAX's out-of-bounds gather)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    tokens = np.asarray(tokens)
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: token id {tokens[where]} at index {where} is outside the "
                         f"model's vocabulary [0, {vocab_size})")


def padding_mask(attention_mask: jax.Array, tokens: jax.Array) -> jax.Array:
    """A ``(B, T)`` attention_mask (nonzero/True = real token) as a bool ``(B, 1, 1, T)`` key
    mask."""
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the tokens' shape {tokens.shape}, got "
                         f"{attention_mask.shape}")
    return attention_mask.astype(bool)[:, None, None, :]


def causal_mask(attention_mask: jax.Array | None, tokens: jax.Array) -> dict:
    """``sdpa`` mask arguments for causal self-attention over ``tokens``: ``is_causal=True``
    (the fast path) without padding, else a dense causal-and-padding bool mask."""
    if attention_mask is None:
        return {"mask": None, "is_causal": True}
    causal = causal_upper_left(tokens.shape[1], tokens.shape[1]).to_dense()
    return {"mask": padding_mask(attention_mask, tokens) & causal, "is_causal": False}


def dropout_keys(rng: jax.Array | None, rate: float, n: int) -> list:
    """``n`` dropout keys from ``rng``; ``None``s when ``rate == 0`` (evaluation)."""
    if rate == 0.0:
        return [None] * n
    if rng is None:
        raise ValueError(f"train=True with dropout={rate} needs rng= (a PRNG key), got None")
    return list(jax.random.split(rng, n))


def decoder_apply(forward, params, tokens: jax.Array, cfg, max_len_name: str,
                  attention_mask: jax.Array | None, train: bool, rng: jax.Array | None):
    """The decoders' ``apply`` on their ``_forward`` (see :func:`apply_cached`): causal over
    ``tokens`` at positions ``0..T-1``, with padding keys masked by ``attention_mask``."""
    check_tokens(tokens, getattr(cfg, max_len_name), max_len_name)
    check_token_ids(tokens, cfg.vocab_size)
    logits, _ = forward(params, tokens, jnp.arange(tokens.shape[1]), cfg, cache=None,
                        train=train, rng=rng, **causal_mask(attention_mask, tokens))
    return logits


def init_cache(cfg, batch: int, max_len: int, max_len_name: str, n_kv_head: int,
               head_dim: int) -> kv_cache.KVCache:
    """The decoders' ``init_cache``: an empty cache in the compute dtype, ``max_len`` at most
    the config's ``max_len_name`` field."""
    if max_len > getattr(cfg, max_len_name):
        raise ValueError(f"max_len={max_len} exceeds the model's "
                         f"{max_len_name}={getattr(cfg, max_len_name)}")
    return kv_cache.init_cache(cfg.n_layer, batch, n_kv_head, max_len, head_dim,
                         cfg.policy.compute_dtype)


def apply_cached(forward, params, tokens: jax.Array, cfg, cache: kv_cache.KVCache,
                 lengths: jax.Array | None):
    """The decoders' ``apply_cached`` on their ``_forward(params, tokens, positions, cfg, *,
    mask, is_causal, cache, train, rng) -> (logits, [(keys, values) per layer])``: ``tokens``
    at absolute positions ``cache.pos[b] + i`` under the cache mask; ``pos`` advances by
    ``lengths`` (default ``T``). Concrete ids and ``pos`` are checked: in the vocabulary, and
    ``pos + T <= max_len`` (under ``jit`` a write past the cache is not caught)."""
    check_tokens(tokens, cache.max_len, "cache max_len")
    check_token_ids(tokens, cfg.vocab_size)
    t = tokens.shape[1]
    if not isinstance(cache.pos, jax.core.Tracer) and int(cache.pos.max()) + t > cache.max_len:
        raise ValueError(f"{t} tokens do not fit the cache: a row already holds "
                         f"{int(cache.pos.max())} of its max_len={cache.max_len} positions")
    positions = cache.pos[:, None] + jnp.arange(t, dtype=cache.pos.dtype)
    logits, kvs = forward(params, tokens, positions, cfg,
                          mask=kv_cache.cache_mask(cache.pos, t, cache.max_len), is_causal=False,
                          cache=cache, train=False, rng=None)
    advance = t if lengths is None else lengths.astype(cache.pos.dtype)
    return logits, kv_cache.KVCache(tuple(k for k, _ in kvs), tuple(v for _, v in kvs),
                                    cache.pos + advance)


def layer_cache(cache: kv_cache.KVCache | None, i: int) -> dict:
    """``self_attention`` keyword arguments for layer ``i`` of ``cache`` (none without one)."""
    if cache is None:
        return {}
    return {"cache": (cache.keys[i], cache.values[i]), "cache_pos": cache.pos}
