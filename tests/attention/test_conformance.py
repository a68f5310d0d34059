"""One conformance suite for every registered kernel: each case (masks of every kind, score_mods,
dropout, GQA, ragged lengths) through the public API, forward and backward, against the math
kernel (itself checked against torch in test_sdpa_vs_torch.py and test_flex.py). A kernel is
skipped only where the selector's reasons say it cannot run the case; the Pallas kernels run in
interpret mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiles import ISAS, pinned_tiles

import transformax as tfx
from transformax.attention import backends
from transformax.attention.backends import pallas_common

B, HQ, HK, L, S, E = 2, 4, 2, 24, 40, 16
KEYS = jax.random.split(jax.random.key(0), 6)
Q = jax.random.normal(KEYS[0], (B, HQ, L, E))
K = jax.random.normal(KEYS[1], (B, HK, S, E))
V = jax.random.normal(KEYS[2], (B, HK, S, E))
COTANGENT = jax.random.normal(KEYS[3], (B, HQ, L, E))
DOCS = jnp.array([[0] * 9 + [1] * 15, [0] * 4 + [1] * 4 + [2] * 16])
KV_DOCS = jnp.array([[0] * 15 + [1] * 25, [0] * 6 + [1] * 6 + [2] * 28])
SLOPES = jnp.linspace(0.5, 2.0, HQ)
BIAS = 0.3 * jax.random.normal(KEYS[4], (L + S,))  # relative-position bias table


def _alibi(slopes):
    return lambda s, b, h, q, kv: s + slopes[h] * (kv - q) / S


def _softcap(s, b, h, q, kv):
    return 5.0 * jnp.tanh(s / 5.0)


def _relative(table):
    return lambda s, b, h, q, kv: s + table[kv - q + L]


# name -> (sdpa/flex keyword arguments, a float array the score_mod captures, or None)
CASES = {
    "plain": (dict(), None),
    "causal": (dict(is_causal=True), None),
    "causal_lower_right": (dict(attn_mask=tfx.causal_lower_right(L, S)), None),
    "dense_bool": (dict(attn_mask=jax.random.bernoulli(KEYS[5], 0.7, (B, 1, L, S))
                        .at[:, :, 3].set(False)), None),
    "dense_float": (dict(attn_mask=jax.random.normal(KEYS[5], (1, HQ, L, S))), None),
    "dropout": (dict(is_causal=True, dropout_p=0.25, dropout_rng=jax.random.key(7)), None),
    "sliding_window": (dict(attn_mask=tfx.sliding_window(L, S, 7, lower_right=True)), None),
    "documents_causal": (dict(attn_mask=tfx.document_mask(DOCS, KV_DOCS)
                              & tfx.causal_upper_left(L, S)), None),
    "prefix_lm": (dict(attn_mask=tfx.prefix_lm(L, S, jnp.array([5, 30]))), None),
    "cache_band_padding": (dict(attn_mask=tfx.band(L, S, None, 0, offset=jnp.array([3, 16]))
                                & tfx.key_padding(jnp.arange(S)[None] >= jnp.array([[0], [2]]))),
                           None),
    "chunked_or_window": (dict(attn_mask=tfx.chunked(L, S, 8) | tfx.sliding_window(L, S, 3)),
                          None),
    "block_mask": (dict(attn_mask=tfx.create_block_mask(
        lambda b, h, q, kv: (kv <= q + 16) & (q - kv < 6 + 3 * h), None, HQ, L, S,
        BLOCK_SIZE=8)), None),
    "strided_block_mask": (dict(attn_mask=tfx.create_block_mask(  # rows not contiguous
        lambda b, h, q, kv: (kv % 3 != 1) & (kv <= q + 16), None, None, L, S, BLOCK_SIZE=8)),
        None),
    "alibi_causal": (dict(score_mod=_alibi, attn_mask=tfx.causal_lower_right(L, S)), SLOPES),
    "softcap_window": (dict(score_mod=lambda _: _softcap,
                            attn_mask=tfx.sliding_window(L, S, 9)), None),
    "relative_bias_documents": (dict(score_mod=_relative,
                                     attn_mask=tfx.document_mask(DOCS, KV_DOCS)), BIAS),
    # Rows that see no key: zeros, an lse of -inf, finite gradients.
    "no_visible_keys": (dict(attn_mask=tfx.document_mask(jnp.full((B, L), 5), KV_DOCS)), None),
}


def attend(case: str, q, k, v, captured):
    """The case's call: flex_attention where it has a score_mod, else sdpa (GQA on)."""
    kwargs = dict(CASES[case][0])
    make_score_mod = kwargs.pop("score_mod", None)
    if make_score_mod is not None:
        return tfx.flex_attention(q, k, v, score_mod=make_score_mod(captured),
                                  block_mask=kwargs.get("attn_mask"), enable_gqa=True,
                                  return_lse=True)
    return tfx.sdpa(q, k, v, enable_gqa=True, return_lse=True, **kwargs)


def _loss(case):
    def loss(q, k, v, captured):
        out, lse = attend(case, q, k, v, captured)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * COTANGENT) + jnp.sum(finite_lse), (out, lse)
    return loss


def _captured(case: str):
    captured = CASES[case][1]
    return jnp.zeros(()) if captured is None else captured


def _reasons(kernel: str, case: str) -> list[str]:
    """Why the selector says ``kernel`` cannot run the case on cpu (empty: it can)."""
    kwargs = dict(CASES[case][0])
    make_score_mod = kwargs.pop("score_mod", None)
    score_mod = None if make_score_mod is None else make_score_mod(_captured(case))
    explanation = tfx.explain(Q, K, V, enable_gqa=True, score_mod=score_mod, **kwargs)
    return next(v.reasons for v in explanation.rows if v.platform == "cpu"
                and v.backend == kernel)


def _results(kernel: str, case: str):
    """Jitted (out, lse) and the gradients of q, k, v and the score_mod's captured array."""
    captured = _captured(case)
    with tfx.sdpa_kernel(kernel), pinned_tiles((8, 16), (16, 8), isa=ISAS[-1]):
        grads, (out, lse) = jax.jit(jax.grad(_loss(case), argnums=(0, 1, 2, 3), has_aux=True))(
            Q, K, V, captured)
    return out, lse, grads


@functools.cache
def reference(case: str):
    return _results("math", case)


def _params():
    fast_pallas = {"sliding_window"}  # the rest: test_pallas.py on small tiles; here slow
    for kernel in backends.KERNELS:
        if kernel == "math":
            continue
        for case in CASES:
            slow = kernel.startswith("pallas") and case not in fast_pallas
            yield pytest.param(kernel, case, id=f"{kernel}-{case}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("kernel, case", list(_params()))
def test_kernel_matches_the_math_kernel(kernel, case, monkeypatch):
    monkeypatch.setenv(pallas_common.INTERPRET_ENV, "1")
    reasons = _reasons(kernel, case)
    assert not (reasons and kernel in ("xla_flash", "pallas_triton", "pallas_tpu")), reasons
    if reasons:
        pytest.skip("; ".join(reasons))
    out, lse, grads = _results(kernel, case)
    want_out, want_lse, want_grads = reference(case)
    if case == "no_visible_keys":
        assert not np.any(want_out) and np.all(want_lse == -np.inf)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dcaptured"), grads, want_grads):
        assert np.all(np.isfinite(got)), name
        scale = float(jnp.max(jnp.abs(want))) or 1.0
        np.testing.assert_allclose(got / scale, want / scale, atol=5e-5, err_msg=name)
