"""Flax drop-in: ``attention_fn`` runs ``tfx.sdpa`` inside Flax's attention modules.

    flax.linen.MultiHeadDotProductAttention(num_heads=8, attention_fn=tfx.flax.attention_fn)
    flax.nnx.MultiHeadAttention(..., attention_fn=tfx.flax.attention_fn)

Same results as Flax's own ``dot_product_attention`` (also with masks, bias, decode caches and,
in nnx, grouped-query attention), except: a query row whose every key is masked gives zeros
(Flax averages all values there); dropout draws another random stream (and ``broadcast_dropout``
is not applied); ``precision`` is not used (bf16/f16 scores and softmax run in f32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformax.attention import causal_upper_left, sdpa


def attention_fn(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None = None,
                 mask: jax.Array | None = None, broadcast_dropout: bool = True,
                 dropout_rng: jax.Array | None = None, dropout_rate: float = 0.0,
                 deterministic: bool = False, dtype=None, precision=None, module=None,
                 is_causal: bool = False) -> jax.Array:
    """``flax.linen.dot_product_attention``'s signature (plus nnx's ``is_causal``) on ``tfx.sdpa``.

    Layout ``(..., L, H, E)`` as in Flax; ``mask``: nonzero = may attend, broadcastable to
    ``(..., H, L, S)``; ``bias`` is added to the scores; ``dtype``: the computation dtype
    (default: the inputs' promoted dtype). Key/value with fewer heads than the query use GQA.
    """
    del broadcast_dropout, precision
    if module is not None:
        raise NotImplementedError("attention_fn does not materialise attention weights, so it "
                                  "cannot sow them: use sow_weights=False")
    dtype = dtype or jnp.result_type(query, key, value)
    q, k, v = (x.astype(dtype).swapaxes(-3, -2) for x in (query, key, value))
    if is_causal and mask is not None:
        causal = causal_upper_left(q.shape[-2], k.shape[-2]).to_dense()
        mask, is_causal = mask.astype(bool) & causal, False
    if mask is not None:
        mask = mask.astype(bool)
        if bias is not None:
            mask = jnp.where(mask, bias.astype(jnp.float32), -jnp.inf)
    elif bias is not None:
        mask = bias.astype(jnp.float32)
    rate = 0.0 if deterministic else dropout_rate
    out = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[-3] != k.shape[-3],
               dropout_p=rate, dropout_rng=dropout_rng if rate > 0 else None)
    return out.swapaxes(-3, -2)
