import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import transformax as tfx
from transformax.flax import attention_fn

B, L, D, H = 2, 8, 32, 4
X = jax.random.normal(jax.random.key(0), (B, L, D))
Q, K, V = (jax.random.normal(jax.random.key(i), (B, L, H, 8)) for i in range(3))
PADDING = jnp.arange(L)[None, :] < jnp.array([[L], [5]])  # row 1: 3 padding tokens
KEY_PADDING = linen.make_attention_mask(jnp.ones((B, L), bool), PADDING)  # no row fully masked
MASK = linen.combine_masks(KEY_PADDING, linen.make_causal_mask(PADDING))  # float 0/1, as Flax's
ours_fn = jax.jit(attention_fn, static_argnames=("deterministic", "is_causal", "dropout_rate"))
flax_fn = jax.jit(linen.dot_product_attention)


def test_namespace():
    assert tfx.flax.attention_fn is attention_fn


def test_attention_fn_matches_flax_with_mask_and_bias():
    bias = jax.random.normal(jax.random.key(3), (B, H, L, L))
    for kwargs in ({}, {"mask": MASK}, {"bias": bias}, {"mask": MASK, "bias": bias}):
        np.testing.assert_allclose(ours_fn(Q, K, V, **kwargs), flax_fn(Q, K, V, **kwargs),
                                   atol=1e-5, rtol=1e-5)


def test_attention_fn_jit_parity():
    kwargs = dict(mask=MASK, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    with jax.disable_jit():
        eager = attention_fn(Q, K, V, **kwargs)
    np.testing.assert_allclose(ours_fn(Q, K, V, **kwargs), eager, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero():
    """Documented difference: Flax averages the values over a fully masked row, we give zeros."""
    both = linen.make_attention_mask(PADDING, PADDING)  # padding queries of row 1 see nothing
    out = ours_fn(Q, K, V, mask=both)
    np.testing.assert_array_equal(out[1, 5:], 0)
    np.testing.assert_allclose(out[:, :5], flax_fn(Q, K, V, mask=both)[:, :5], atol=1e-5,
                               rtol=1e-5)


def test_dropout_is_deterministic_per_key():
    a = ours_fn(Q, K, V, dropout_rate=0.5, dropout_rng=jax.random.key(5))
    np.testing.assert_array_equal(a, ours_fn(Q, K, V, dropout_rate=0.5,
                                             dropout_rng=jax.random.key(5)))
    assert not np.allclose(a, ours_fn(Q, K, V))
    np.testing.assert_array_equal(ours_fn(Q, K, V, dropout_rate=0.5, deterministic=True),
                                  ours_fn(Q, K, V))


def linen_mha(fn, **kwargs):
    return linen.MultiHeadDotProductAttention(num_heads=H, **kwargs,
                                              **({} if fn is None else {"attention_fn": fn}))


PARAMS = linen_mha(None).init(jax.random.key(1), X)


def test_linen_mha_matches_default():
    for mask in (None, MASK):
        outs = [jax.jit(linen_mha(fn).apply)(PARAMS, X, mask=mask) for fn in (attention_fn, None)]
        np.testing.assert_allclose(*outs, atol=1e-5, rtol=1e-5)


def test_linen_decode_matches_default():
    def decode(fn):
        model = linen_mha(fn, decode=True)
        cache = model.init(jax.random.key(1), X)["cache"]
        step = jax.jit(lambda cache, x: model.apply({**PARAMS, "cache": cache}, x,
                                                    mutable=["cache"]))
        outs = []
        for i in range(L):
            y, mutated = step(cache, X[:, i:i + 1])
            cache = mutated["cache"]
            outs.append(y)
        return jnp.concatenate(outs, 1)

    np.testing.assert_allclose(decode(attention_fn), decode(None), atol=1e-5, rtol=1e-5)


def test_sow_weights_is_an_error():
    with pytest.raises(NotImplementedError, match="cannot sow them: use sow_weights=False"):
        linen_mha(attention_fn).apply(PARAMS, X, sow_weights=True)


def nnx_mha(fn):
    return nnx.MultiHeadAttention(num_heads=H, in_features=D, num_kv_heads=2, decode=False,
                                  rngs=nnx.Rngs(0), **({} if fn is None else {"attention_fn": fn}))


@nnx.jit(static_argnames=("is_causal", "decode"))
def nnx_call(model, x, mask=None, is_causal=False, decode=False):
    return model(x, mask=mask, is_causal=is_causal, decode=decode)


def test_nnx_gqa_mask_and_causal_match_default():
    ours, ref = nnx_mha(attention_fn), nnx_mha(None)
    for kwargs in ({}, {"mask": MASK}, {"is_causal": True},
                   {"mask": KEY_PADDING, "is_causal": True}):
        np.testing.assert_allclose(nnx_call(ours, X, **kwargs), nnx_call(ref, X, **kwargs),
                                   atol=1e-5, rtol=1e-5)


def test_nnx_decode_matches_default():
    def decode(fn):
        model = nnx_mha(fn)
        model.init_cache(X.shape)
        return jnp.concatenate([nnx_call(model, X[:, i:i + 1], decode=True) for i in range(L)], 1)

    np.testing.assert_allclose(decode(attention_fn), decode(None), atol=1e-5, rtol=1e-5)
