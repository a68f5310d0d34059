"""The decoder gpt and llama share: token (and learned position) embedding, pre-norm blocks of
self-attention and an MLP with residual adds, a final norm, an output head.

A model module names what differs in an :class:`Arch` (parameter names, the norm, the MLP,
learned positions or RoPE); the numbers come from its ``Config``, which provides the decoder
contract: ``vocab_size``, ``n_layer``, ``n_head``, ``n_kv_head``, ``head_dim``, ``max_len``
(and ``max_len_field``, the field users set, for messages), ``norm_eps``, ``dropout``,
``tie_embeddings``, ``sliding_window``, ``attn_logit_softcapping``, ``policy`` and, for RoPE,
``rope_theta`` and ``rope_scaling``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from transformax import attention, nn
from transformax.models import _common
from transformax.nn import kv_cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arch:
    """What a decoder names and computes its own way. ``embed``: the token table (also the
    head when tied, else ``lm_head``); ``position_table``: learned positions, or ``None`` for
    RoPE; ``attn_norm`` / ``mlp_norm``: the block's pre-norms; ``norm(params, x, eps=)`` and
    ``mlp(params, x)``: the layer functions."""

    embed: str
    position_table: str | None
    attn_norm: str
    mlp_norm: str
    final_norm: str
    norm: Callable
    mlp: Callable


def forward(arch: Arch, params, tokens, positions, cfg, *, mask, cache=None,
            cache_update=kv_cache.append, train=False, rng=None):
    """``(logits, [(keys, values) per layer])`` for ``tokens (B, T)`` at ``positions``
    (``(T,)`` or ``(B, T)``) under the attention ``mask`` (``None``: causal); with ``cache``
    (a :class:`~transformax.nn.KVCache`) each layer's keys and values enter it by
    ``cache_update`` (see :func:`transformax.nn.self_attention`)."""
    policy = cfg.policy
    p = policy.cast_to_compute(params)
    rate = cfg.dropout if train else 0.0
    keys = iter(_common.dropout_keys(rng, rate, 1 + 3 * cfg.n_layer))
    norm = functools.partial(arch.norm, eps=cfg.norm_eps)
    x = nn.embed(p[arch.embed], tokens)
    rope = None
    if arch.position_table is None:
        rope = nn.rope_angles(positions, nn.inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                                 cfg.rope_scaling))
    else:
        x = x + nn.embed(p[arch.position_table], positions)
    x = nn.dropout(x, rate, next(keys))
    cap = cfg.attn_logit_softcapping
    score_mod = None if cap is None else nn.softcap(cap)
    kvs = []
    for i, blk in enumerate(p["blocks"]):
        layer_cache = {} if cache is None else {
            "cache": (cache.keys[i], cache.values[i]), "cache_pos": cache.pos,
            "cache_update": cache_update}
        h, kv = nn.self_attention(
            blk["attn"], norm(blk[arch.attn_norm], x), n_head=cfg.n_head,
            n_kv_head=cfg.n_kv_head, rope=rope, mask=mask, is_causal=mask is None,
            score_mod=score_mod, dropout_rate=rate, dropout_rng=next(keys), **layer_cache)
        x = x + nn.dropout(h, rate, next(keys))
        x = x + nn.dropout(arch.mlp(blk["mlp"], norm(blk[arch.mlp_norm], x)), rate, next(keys))
        kvs.append(kv)
    x = norm(p[arch.final_norm], x)
    logits = nn.unembed(p[arch.embed], x) if cfg.tie_embeddings else nn.linear(p["lm_head"], x)
    return policy.cast_to_output(logits), kvs


def apply(arch: Arch, params, tokens: jax.Array, cfg, *, attention_mask=None,
          document_ids=None, train: bool = False, rng=None, check_ids: bool = False) -> jax.Array:
    """The decoders' ``apply``: causal (within ``cfg.sliding_window``) over ``tokens``, keys
    masked by ``attention_mask (B, T)`` (nonzero: a real token). ``document_ids (B, T)``: a
    packed batch; no token attends across documents and positions restart at each one.
    ``check_ids``: check traced ids too (see :func:`_common.check_token_ids`)."""
    _common.check_tokens(tokens, cfg)
    _common.check_token_ids(tokens, cfg.vocab_size, traced=check_ids)
    t = tokens.shape[1]
    positions = jnp.arange(t)
    if document_ids is not None:
        _common.check_same_shape("document_ids", document_ids, tokens)
        positions = document_positions(document_ids)
    if attention_mask is not None:
        _common.check_same_shape("attention_mask", attention_mask, tokens)
    mask = _self_mask(t, cfg.sliding_window, attention_mask, document_ids)
    return forward(arch, params, tokens, positions, cfg, mask=mask, train=train, rng=rng)[0]


def _self_mask(t: int, window: int | None, attention_mask, document_ids):
    """Causal self-attention over ``t`` tokens (within ``window``), keys masked by padding and
    documents, as a structured mask (kernels skip the blocks it hides); ``None`` for plain
    causal (``sdpa``'s ``is_causal``)."""
    if window is None and attention_mask is None and document_ids is None:
        return None
    mask = (attention.causal_upper_left(t, t) if window is None
            else attention.sliding_window(t, t, window))
    if attention_mask is not None:
        mask = mask & attention.key_padding(attention_mask.astype(bool))
    if document_ids is not None:
        mask = mask & attention.document_mask(document_ids)
    return mask


def document_positions(document_ids: jax.Array) -> jax.Array:
    """``(B, T)`` positions counted from the start of each token's document (a run of equal
    ids)."""
    t = document_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(document_ids[:, :1], bool),
                              document_ids[:, 1:] != document_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def init_cache(cfg, batch: int, max_len: int) -> kv_cache.KVCache:
    """An empty cache in the compute dtype for rows of up to ``max_len <= cfg.max_len`` tokens;
    with a sliding window it holds only ``min(max_len, sliding_window)`` slots (rolling)."""
    if max_len > cfg.max_len:
        raise ValueError(f"max_len={max_len} exceeds the model's "
                         f"{cfg.max_len_field}={cfg.max_len}")
    slots = max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window)
    return kv_cache.init_cache(cfg.n_layer, batch, cfg.n_kv_head, slots, cfg.head_dim,
                               cfg.policy.compute_dtype)


def apply_cached(arch: Arch, params, tokens: jax.Array, cfg, cache: kv_cache.KVCache,
                 lengths: jax.Array | None, check_ids: bool = False):
    """The decoders' ``apply_cached``: ``tokens`` at absolute positions ``cache.pos[b] + i``;
    ``pos`` advances by ``lengths`` (default ``T``). A cache of ``sliding_window`` slots rolls
    (position ``p`` in slot ``p % sliding_window``). Concrete ids and ``pos`` are checked: in
    the vocabulary, and within the cache; traced ones (under ``jit``) only with
    ``check_ids=True``."""
    rolling = cfg.sliding_window is not None and cache.max_len == cfg.sliding_window
    limit, name = (cfg.max_len, cfg.max_len_field) if rolling else (cache.max_len, "max_len")
    _common.check_tokens(tokens, cfg)
    _common.check_token_ids(tokens, cfg.vocab_size, traced=check_ids)
    t = tokens.shape[1]
    _common.check_cache_room(cache.pos, t, limit, name, traced=check_ids)
    advance = jnp.full_like(cache.pos, t) if lengths is None else lengths.astype(cache.pos.dtype)
    positions = cache.pos[:, None] + jnp.arange(t, dtype=cache.pos.dtype)
    if rolling:
        mask = kv_cache.rolling_mask(cache.pos, t, cache.max_len)
        update = functools.partial(kv_cache.roll, lengths=advance)
    else:
        mask = attention.band(t, cache.max_len, left=None, right=0, offset=cache.pos)
        update = kv_cache.append
    logits, kvs = forward(arch, params, tokens, positions, cfg, mask=mask, cache=cache,
                          cache_update=update)
    return logits, kv_cache.KVCache(tuple(k for k, _ in kvs), tuple(v for _, v in kvs),
                                    cache.pos + advance)
