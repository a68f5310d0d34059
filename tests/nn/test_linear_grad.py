"""nn.linear's derivatives on a batched (3-D) input, whose matmul runs flattened to 2-D: the
gradients match PyTorch's, and forward mode (jvp) still works."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformax import nn

torch = pytest.importorskip("torch")

X = jax.random.normal(jax.random.key(0), (2, 5, 16))
P = nn.linear_init(jax.random.key(1), 16, 8)
G = jax.random.normal(jax.random.key(2), (2, 5, 8))


def test_linear_gradients_match_torch():
    grad_p, grad_x = jax.grad(lambda p, x: jnp.sum(nn.linear(p, x) * G), argnums=(0, 1))(P, X)
    tx, tw, tb = (torch.tensor(np.asarray(a), requires_grad=True) for a in (X, P["w"], P["b"]))
    (torch.nn.functional.linear(tx, tw.T, tb) * torch.tensor(np.asarray(G))).sum().backward()
    np.testing.assert_allclose(grad_p["w"], tw.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_p["b"], tb.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, tx.grad, rtol=1e-5, atol=1e-5)


def test_linear_forward_mode():
    dx = jnp.ones_like(X)
    y, dy = jax.jvp(lambda x: nn.linear(P, x), (X,), (dx,))
    np.testing.assert_allclose(dy, dx @ P["w"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, X @ P["w"] + P["b"], rtol=1e-5, atol=1e-5)
