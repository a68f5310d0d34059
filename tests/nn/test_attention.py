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


def gemma2_attention(params, x, cap):
    """Hugging Face's Gemma 2 attention layer (eager; identity rotation, scale 1/sqrt(8))
    holding ``params``, causal over ``x``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention

    cfg = transformers.Gemma2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, query_pre_attn_scalar=8, attention_bias=True,
                                    attn_logit_softcapping=cap, num_hidden_layers=1,
                                    layer_types=["full_attention"])
    cfg._attn_implementation = "eager"
    layer = Gemma2Attention(cfg, layer_idx=0).eval()
    w, b = (np.asarray(params["qkv"][k]) for k in ("w", "b"))
    with torch.no_grad():
        for proj, wi, bi in zip((layer.q_proj, layer.k_proj, layer.v_proj),
                                np.split(w, [32, 48], 1), np.split(b, [32, 48])):
            proj.weight.copy_(torch.tensor(wi.T))
            proj.bias.copy_(torch.tensor(bi))
        layer.o_proj.weight.copy_(torch.tensor(np.asarray(params["out"]["w"]).T))
        layer.o_proj.bias.copy_(torch.tensor(np.asarray(params["out"]["b"])))
        t = x.shape[1]
        causal = torch.triu(torch.full((t, t), -torch.inf), 1)[None, None]
        y, _ = layer(torch.tensor(np.asarray(x)), (torch.ones(1, t, 8), torch.zeros(1, t, 8)),
                     causal)
    return y.numpy()


def test_softcapped_self_attention_matches_reference():
    params = jax.tree.map(lambda w: 8 * w, PARAMS)  # scores of order 1, which a cap of 0.3 bends
    y, _ = jax.jit(lambda x: nn.self_attention(params, x, n_head=4, n_kv_head=2, is_causal=True,
                                               score_mod=nn.softcap(0.3)))(X)
    np.testing.assert_allclose(y, reference(params, X, 4, 2, cap=0.3), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y, gemma2_attention(params, X, 0.3), atol=1e-5, rtol=1e-5)
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
    buf = jnp.broadcast_to(jnp.arange(10.0, 14.0)[None, None, :, None], (2, 1, 4, 1))  # 4 slots
    new = jnp.broadcast_to(jnp.arange(1.0, 7.0)[None, None, :, None], (2, 1, 6, 1))  # t + 1
    pos, lengths = jnp.array([0, 3]), jnp.array([6, 2])

    def rolled(pos, lengths):
        keys, _, (cache, _) = kv_cache.roll((buf, buf), new, new, pos, lengths=lengths)
        return keys, cache, kv_cache.rolling_mask(pos, 6, 4).to_dense()

    keys, cache, mask = jax.jit(rolled)(pos, lengths)
    with jax.disable_jit():
        for a, b in zip((keys, cache, mask), rolled(pos, lengths)):
            np.testing.assert_array_equal(a, b)
    # the slots in position order (row 1 at position 3: slots 3, 0, 1, 2), then the new keys
    np.testing.assert_array_equal(keys[:, 0, :, 0], [[10, 11, 12, 13, 1, 2, 3, 4, 5, 6],
                                                     [13, 10, 11, 12, 1, 2, 3, 4, 5, 6]])
    # row 0: positions 0..5, the last four (2..5) in slots 2, 3, 0, 1; row 1: positions 3, 4
    # (its two real tokens) in slots 3 and 0
    np.testing.assert_array_equal(cache[:, 0, :, 0], [[5, 6, 3, 4], [2, 11, 12, 1]])
    assert mask.shape == (2, 1, 6, 10)
    # row 1: keys at positions -1 (never written), 0, 1, 2, then 3..8; position 3 sees 0..3
    np.testing.assert_array_equal(mask[1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[1, 0, 1], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    # row 0: an empty cache; position 5 sees positions 2..5
    np.testing.assert_array_equal(mask[0, 0, 5], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(mask[0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("name, fn", [
    ("self_attention", lambda x: nn.self_attention(PARAMS, x, n_head=4, n_kv_head=2,
                                                   is_causal=True)[0]),
    ("softcap", lambda x: nn.self_attention(PARAMS, x, n_head=4, n_kv_head=2, is_causal=True,
                                            score_mod=nn.softcap(0.3))[0]),
    ("cached", lambda x: nn.self_attention(
        PARAMS, x, n_head=4, n_kv_head=2, mask=tfx.band(6, 8, offset=jnp.array([0, 2])),
        cache=(jnp.zeros((2, 2, 8, 8)),) * 2, cache_pos=jnp.array([0, 2]))[1][0]),
    ("init", lambda x: nn.init_cache(2, 2, 2, 8, 4).keys[1] + x.sum()),
])
def test_jit_parity(name, fn):
    with jax.disable_jit():
        eager = fn(X)
    np.testing.assert_allclose(jax.jit(fn)(X), eager, rtol=1e-5, atol=1e-6)
