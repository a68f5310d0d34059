"""Linear, embedding, norms and MLPs against PyTorch; every function jitted and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformax import nn

torch = pytest.importorskip("torch")
F = torch.nn.functional

X = jax.random.normal(jax.random.key(0), (2, 5, 16))
KEY = jax.random.key(1)


def t(x):
    return torch.from_numpy(np.asarray(x, np.float32).copy())


def test_linear_and_embedding_match_torch():
    p = nn.linear_init(KEY, 16, 8)
    assert p["w"].shape == (16, 8) and p["b"].shape == (8,)
    np.testing.assert_allclose(nn.linear(p, X), F.linear(t(X), t(p["w"]).T, t(p["b"])), atol=1e-5)
    assert "b" not in nn.linear_init(KEY, 16, 8, bias=False)
    table = nn.embedding_init(KEY, 10, 16)
    ids = jnp.array([[1, 9, 0]])
    np.testing.assert_array_equal(nn.embed(table, ids), F.embedding(torch.tensor([[1, 9, 0]]), t(table)))
    np.testing.assert_allclose(nn.unembed(table, X), t(X) @ t(table).T, atol=1e-5)
    with pytest.raises(TypeError, match="ids must be integers, got dtype float32"):
        nn.embed(table, ids.astype(jnp.float32))


def test_norms_match_torch():
    ln = nn.layer_norm_init(16)
    ln = {"scale": ln["scale"] + 0.5, "bias": ln["bias"] + 0.1}
    np.testing.assert_allclose(nn.layer_norm(ln, X, eps=1e-5),
                               F.layer_norm(t(X), (16,), t(ln["scale"]), t(ln["bias"]), 1e-5),
                               atol=1e-5)
    rms = {"scale": nn.rms_norm_init(16)["scale"] * 1.5}
    np.testing.assert_allclose(nn.rms_norm(rms, X, eps=1e-6),
                               F.rms_norm(t(X), (16,), t(rms["scale"]), 1e-6), atol=1e-5)
    low = X.astype(jnp.bfloat16)
    assert nn.layer_norm(nn.layer_norm_init(16, dtype=jnp.bfloat16), low).dtype == jnp.bfloat16
    assert nn.rms_norm(nn.rms_norm_init(16, dtype=jnp.bfloat16), low).dtype == jnp.bfloat16


def test_mlps_match_torch():
    p = nn.gelu_mlp_init(KEY, 16, 32)
    fc, proj = p["fc"], p["proj"]
    for approximate, mode in ((True, "tanh"), (False, "none")):
        ref = F.linear(F.gelu(F.linear(t(X), t(fc["w"]).T, t(fc["b"])), approximate=mode),
                       t(proj["w"]).T, t(proj["b"]))
        np.testing.assert_allclose(nn.gelu_mlp(p, X, approximate=approximate), ref, atol=1e-5)
    p = nn.swiglu_init(KEY, 16, 32)
    gate, up = t(p["gate_up"]["w"]).T.chunk(2)
    ref = F.linear(F.silu(F.linear(t(X), gate)) * F.linear(t(X), up), t(p["down"]["w"]).T)
    np.testing.assert_allclose(nn.swiglu(p, X), ref, atol=1e-5)


def test_dropout():
    np.testing.assert_array_equal(nn.dropout(X, 0.0, None), X)
    y = nn.dropout(jnp.ones((1000,)), 0.25, KEY)
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 4 / 3])
    np.testing.assert_array_equal(y, nn.dropout(jnp.ones((1000,)), 0.25, KEY))
    with pytest.raises(ValueError, match="dropout with rate=0.5 needs a PRNG key"):
        nn.dropout(X, 0.5, None)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        nn.dropout(X, 1.0, KEY)


def test_residual_std():
    assert nn.init.residual_std(0.02, 8) == pytest.approx(0.005)


def test_policy():
    prec = nn.Precision(compute_dtype="bfloat16", output_dtype="float32")
    policy = prec.policy
    tree = {"w": jnp.ones((2,)), "ids": jnp.arange(3)}
    cast = policy.cast_to_compute(tree)
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == tree["ids"].dtype
    assert policy.cast_to_output(cast)["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"param_dtype='int8': expected one of"):
        nn.Precision(param_dtype="int8")


@pytest.mark.parametrize("name, fn", [
    ("linear", lambda x: nn.linear(nn.linear_init(KEY, 16, 8), x)),
    ("embed/unembed", lambda x: nn.unembed(nn.embedding_init(KEY, 10, 16),
                                           x + nn.embed(nn.embedding_init(KEY, 10, 16),
                                                        jnp.zeros((2, 5), jnp.int32)))),
    ("layer_norm", lambda x: nn.layer_norm(nn.layer_norm_init(16), x)),
    ("rms_norm", lambda x: nn.rms_norm(nn.rms_norm_init(16), x)),
    ("gelu_mlp", lambda x: nn.gelu_mlp(nn.gelu_mlp_init(KEY, 16, 32), x)),
    ("swiglu", lambda x: nn.swiglu(nn.swiglu_init(KEY, 16, 32), x)),
    ("dropout", lambda x: nn.dropout(x, 0.3, KEY)),
    ("policy", lambda x: nn.Precision(compute_dtype="bfloat16").policy.cast_to_compute(x)),
])
def test_jit_parity(name, fn):
    with jax.disable_jit():
        eager = fn(X)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(X), np.float32),
                               np.asarray(eager, np.float32), rtol=1e-5, atol=1e-6)
