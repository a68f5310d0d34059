"""Dropout: explicit key, deterministic, the same stream in every kernel, unbiased."""

import jax
import jax.numpy as jnp
import numpy as np

import transformax as tfx

rng = np.random.default_rng(0)
Q, K, V = (jnp.asarray(rng.standard_normal((2, 2, 20, 8)), jnp.float32) for _ in range(3))


def dropped(backend, key, p=0.4, **kwargs):
    f = jax.value_and_grad(
        lambda q, k, v: jnp.sum(jnp.sin(tfx.sdpa(q, k, v, dropout_p=p, dropout_rng=key, **kwargs))),
        argnums=(0, 1, 2))
    with tfx.sdpa_kernel(backend):
        return jax.jit(f)(Q, K, V)


def test_same_key_same_result_and_kernels_share_the_stream():
    key = jax.random.key(7)
    math = dropped(tfx.Backend.MATH, key, is_causal=True)
    flash = dropped(tfx.Backend.XLA_FLASH, key, is_causal=True)
    again = dropped(tfx.Backend.XLA_FLASH, key, is_causal=True)
    for a, b, c in zip(jax.tree.leaves(math), jax.tree.leaves(flash), jax.tree.leaves(again)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(b, c)
    other = dropped(tfx.Backend.XLA_FLASH, jax.random.key(8), is_causal=True)
    assert not np.allclose(other[0], flash[0])


def test_dropout_is_inverted_and_drops_the_right_fraction():
    # Uniform attention over S keys of value 1: each output is (#kept / S) / (1 - p).
    q = jnp.zeros((64, 1, 256, 8))
    k = jnp.zeros((64, 1, 256, 8))
    v = jnp.ones((64, 1, 256, 1))
    p = 0.25
    out = tfx.sdpa(q, k, v, dropout_p=p, dropout_rng=jax.random.key(0))
    kept = np.asarray(out) * (1 - p)
    assert abs(kept.mean() - (1 - p)) < 2e-3
    assert 0.5 < kept.std() * np.sqrt(256) / np.sqrt(p * (1 - p)) < 1.5  # binomial spread
    assert abs(np.asarray(out).mean() - 1.0) < 3e-3


def test_raw_uint32_keys_work():
    out = tfx.sdpa(Q, K, V, dropout_p=0.5, dropout_rng=jax.random.PRNGKey(1))
    assert out.shape == Q.shape and np.isfinite(np.asarray(out)).all()
