"""The self-attention layer and the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx
from transformax import nn
from transformax.nn import kv_cache

X = jax.random.normal(jax.random.key(0), (2, 6, 32))
PARAMS = nn.attention_init(jax.random.key(1), 32, 4, 2, 8)  # GQA: 4 query heads, 2 kv heads


def reference(params, x, n_head, n_kv, cap=None):
    """Plain-JAX causal GQA attention (repeated kv heads, materialised scores), the scores
    soft-capped at ``cap``."""
    b, t, _ = x.shape
    qkv = x @ params["qkv"]["w"] + params["qkv"]["b"]
    q, k, v = jnp.split(qkv, [n_head * 8, (n_head + n_kv) * 8], -1)
    q = q.reshape(b, t, n_head, 8)
    k, v = (jnp.repeat(a.reshape(b, t, n_kv, 8), n_head // n_kv, axis=2) for a in (k, v))
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(8)
    s = s if cap is None else cap * jnp.tanh(s / cap)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    y = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s, -1), v).reshape(b, t, n_head * 8)
    return y @ params["out"]["w"] + params["out"]["b"]


@jax.jit
def attend(x, mask=None, cache=None, pos=None):
    return nn.self_attention(PARAMS, x, n_head=4, n_kv_head=2, mask=mask, is_causal=mask is None,
                             cache=cache, cache_pos=pos)


def test_self_attention_gqa_matches_reference():
    y, cache = attend(X)
    assert cache is None
    np.testing.assert_allclose(y, reference(PARAMS, X, 4, 2), atol=1e-5)


def test_softcapped_self_attention_matches_reference():
    params = jax.tree.map(lambda w: 8 * w, PARAMS)  # scores of order 1, which a cap of 0.3 bends
    y, _ = jax.jit(lambda x: nn.self_attention(params, x, n_head=4, n_kv_head=2, is_causal=True,
                                               score_mod=nn.softcap(0.3)))(X)
    np.testing.assert_allclose(y, reference(params, X, 4, 2, cap=0.3), atol=1e-5, rtol=1e-5)
    assert np.abs(y - reference(params, X, 4, 2)).max() > 0.1
    with pytest.raises(ValueError, match="a score_mod \\(flex_attention\\) has no attention "
                                         "dropout; got dropout_rate=0.1"):
        nn.self_attention(PARAMS, X, n_head=4, n_kv_head=2, score_mod=nn.softcap(0.3),
                          dropout_rate=0.1, dropout_rng=jax.random.key(0))


def test_cache_write_and_mask():
    cache = nn.init_cache(1, 2, 2, 8, 4)
    assert cache.max_len == 8 and cache.keys[0].shape == (2, 2, 8, 4)
    new = jnp.ones((2, 2, 3, 4))
    buf = kv_cache.write(cache.keys[0], new, jnp.array([0, 4]))
    np.testing.assert_array_equal(buf[:, 0, :, 0], [[1, 1, 1, 0, 0, 0, 0, 0],
                                                    [0, 0, 0, 0, 1, 1, 1, 0]])
    mask = tfx.band(2, 8, left=None, right=0, offset=jnp.array([0, 4])).to_dense()
    assert mask.shape == (2, 1, 2, 8)
    np.testing.assert_array_equal(mask[1, 0], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((2, 8)), 0))


def test_cached_self_attention_matches_full():
    buf = nn.init_cache(1, 2, 2, 8, 8)
    cache, pos = (buf.keys[0], buf.values[0]), buf.pos
    steps = []
    for lo, hi in ((0, 5), (5, 6)):
        y, cache = attend(X[:, lo:hi], tfx.band(hi - lo, 8, offset=pos), cache, pos)
        pos = pos + (hi - lo)
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), reference(PARAMS, X, 4, 2), atol=1e-5)


def test_rolling_cache_keeps_the_last_window_of_real_tokens():
    buf = jnp.zeros((2, 1, 4, 1))  # a window of 4 slots
    new = jnp.broadcast_to(jnp.arange(1.0, 7.0)[None, None, :, None], (2, 1, 6, 1))  # t + 1
    pos, lengths = jnp.array([0, 3]), jnp.array([6, 2])
    keys, _, (rolled, _) = kv_cache.roll((buf, buf), new, new, pos, lengths=lengths)
    assert keys.shape == (2, 1, 10, 1)
    # row 0: positions 0..5, the last four (2..5) in slots 2, 3, 0, 1; row 1: positions 3, 4
    # (its two real tokens) in slots 3 and 0
    np.testing.assert_array_equal(rolled[:, 0, :, 0], [[5, 6, 3, 4], [2, 0, 0, 1]])
    mask = kv_cache.rolling_mask(pos, 6, 4).to_dense()
    assert mask.shape == (2, 1, 6, 10)
    # row 1 at position 3: slots 0..2 hold positions 0..2, slot 3 nothing yet
    np.testing.assert_array_equal(mask[1, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[1, 0, 1], [0, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    # row 0: an empty cache; position 5 sees positions 2..5
    np.testing.assert_array_equal(mask[0, 0, 5], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("name, fn", [
    ("self_attention", lambda x: nn.self_attention(PARAMS, x, n_head=4, n_kv_head=2,
                                                   is_causal=True)[0]),
    ("softcap", lambda x: nn.self_attention(PARAMS, x, n_head=4, n_kv_head=2, is_causal=True,
                                            score_mod=nn.softcap(0.3))[0]),
    ("cached", lambda x: nn.self_attention(
        PARAMS, x, n_head=4, n_kv_head=2, mask=tfx.band(6, 8, offset=jnp.array([0, 2])),
        cache=(jnp.zeros((2, 2, 8, 8)),) * 2, cache_pos=jnp.array([0, 2]))[1][0]),
    ("init", lambda x: nn.init_cache(2, 2, 2, 8, 4).keys[1] + x.sum()),
    ("roll", lambda x: kv_cache.roll((x[:, None, :4, :8],) * 2, x[:, None, :, 8:16],
                                     x[:, None, :, 16:24], jnp.array([3, 9]),
                                     lengths=jnp.array([6, 2]))[2][0]),
    ("rolling_mask", lambda x: kv_cache.rolling_mask(jnp.array([3, 9]), 6, 4).to_dense()
     * x.sum()),
])
def test_jit_parity(name, fn):
    with jax.disable_jit():
        eager = fn(X)
    np.testing.assert_allclose(jax.jit(fn)(X), eager, rtol=1e-5, atol=1e-6)
