"""The native x86 int8 matmul (``cpu_int8``) against dequantize-then-matmul in NumPy: both code
paths (the host's, and AVX2 as an emulated AVX2 host runs it), ragged shapes, integer extremes,
zero rows, jit / eager, vmap; and the reasons it cannot run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformax import host, native, nn, quant
from transformax.quant.kernels import cpu_int8
from transformax.quant.problem import Problem

needs_native = pytest.mark.skipif(
    cpu_int8.EXTENSION.module is None or host.current().isa == "none",
    reason="the native int8 extension is not built or this CPU lacks AVX2")
ISAS = sorted({"avx2", host.current().isa} - {"none"})
# 130 weight rows: two passes of the kernel's 64-row chunks and a ragged quad; 137 columns: two
# 64-column panels (four of 32 with AVX2) and scalar ones.
K, N = 130, 137
RNG = np.random.default_rng(0)
W = RNG.standard_normal((K, N)).astype(np.float32)
W[:, 5] = 0.0  # an all-zero column
X = (RNG.standard_normal((8, K)) * np.linspace(0.1, 10, 8)[:, None] + 0.5).astype(np.float32)
X[3] = 0.0  # an all-zero row


def qw_of(recipe):
    return quant.quantize({"w": jnp.asarray(W)}, recipe)["w"]


def reference(x, qw):
    """Dequantize-then-matmul in float64, with the activations quantized as the recipe says."""
    w = np.asarray(qw.dequantize(), np.float64)
    x = x.astype(np.float64)
    if qw.activations == "none":
        return x @ w
    if qw.act_symmetric:
        s = np.abs(x).max(1, keepdims=True) / 127
        s = np.where(s > 0, s, 1.0)
        return np.clip(np.round(x / s), -127, 127) * s @ w
    lo, hi = np.minimum(x.min(1, keepdims=True), 0), np.maximum(x.max(1, keepdims=True), 0)
    s = np.where(hi > lo, (hi - lo) / 255, 1.0)
    z = np.clip(np.round(-128 - lo / s), -128, 127)
    return (np.clip(np.round(x / s) + z, -128, 127) - z) * s @ w


def run(qw, x, isa, monkeypatch):
    """``x @ qw`` on cpu_int8 with the ``isa`` code path (a fresh trace: the path is chosen
    when traced)."""
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", isa)
    with quant.kernel([quant.Kernel.CPU_INT8]):
        return np.asarray(jax.jit(functools.partial(nn.linear))({"w": qw}, jnp.asarray(x)))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("recipe", ["int8-weight", "int8-dynamic",
                                    quant.Recipe(activations="dynamic", act_symmetric=False)])
def test_matches_dequantize_then_matmul(recipe, isa, monkeypatch):
    qw = qw_of(recipe)
    for rows in (1, 3, 4):  # one row tile, a ragged one, two (AVX2's most)
        x = X[:rows]
        ref = reference(x, qw)
        y = run(qw, x, isa, monkeypatch)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert np.all(y[:, 5] == 0)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_integer_products_are_exact_at_the_extremes(isa, monkeypatch):
    """int8 sums are exact int32: activations at -128 (a zero point) and +-127 times weights at
    +-127 (AVX2's 16-bit pair sums stay below saturation)."""
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", isa)
    xq = np.tile(np.array([-128, 127, -127, 0, 127], np.int8), 26)[None, :K].repeat(3, 0)
    xq[1] = np.roll(xq[1], 1)
    wq = np.where(RNG.random((K, N)) < 0.5, -127, 127).astype(np.int8)
    dot = jax.jit(lambda x, w: cpu_int8._dot(x, w))
    np.testing.assert_array_equal(dot(xq, wq), xq.astype(np.int64) @ wq.astype(np.int64))


@needs_native
def test_jit_matches_eager_zero_rows_and_vmap():
    qw = qw_of("int8-dynamic")
    x = jnp.asarray(X[:4])
    with quant.kernel([quant.Kernel.CPU_INT8]):
        jitted = jax.jit(nn.linear)({"w": qw}, x)
        with jax.disable_jit():
            eager = nn.linear({"w": qw}, x)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
        assert nn.linear({"w": qw}, jnp.zeros((0, K))).shape == (0, N)
        # vmap over tokens folds the batch into the rows; over stacked weights, one call each
        per_token = jax.vmap(nn.linear, in_axes=(None, 0))({"w": qw}, x[:, None])
        np.testing.assert_allclose(per_token[:, 0], jitted, rtol=1e-6, atol=1e-6)
        stacked = jax.tree.map(lambda a: jnp.stack([a, a]), qw)
        per_weight = jax.vmap(lambda w: nn.linear({"w": w}, x))(stacked)
        np.testing.assert_allclose(per_weight, np.stack([jitted, jitted]), rtol=1e-6,
                                   atol=1e-6)


def test_reasons_it_cannot_run(monkeypatch):
    qw = qw_of("int8-weight")
    most = cpu_int8.max_rows()
    many = Problem.of(jnp.zeros((most + 1, K)), qw)
    assert f"{most + 1} rows: a kernel for at most {most} here" in " ".join(
        cpu_int8.reasons_unsupported(many, "cpu"))
    grouped = Problem.of(jnp.zeros((1, K)), qw_of(quant.Recipe(bits=4, weight_granularity="group",
                                                                group_size=10)))
    reasons = " ".join(cpu_int8.reasons_unsupported(grouped, "cpu"))
    assert "grouped weight scales" in reasons and "packed int4" in reasons
    monkeypatch.setattr(cpu_int8, "EXTENSION", native.load("_not_built", {}))
    e = quant.explain(X[:1], qw)
    assert ("cpu_int8       cannot run: the native extension is not built (No module named "
            "'transformax._not_built')") in str(e)
    assert e.chosen("cpu") == quant.Kernel.XLA_INT8X2  # the next by priority


def test_code_path_follows_the_emulated_isa(monkeypatch):
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", "avx2")
    assert cpu_int8.isa(True) == cpu_int8.isa(False) == "avx2" and cpu_int8.max_rows() == 4
    monkeypatch.delenv("TRANSFORMAX_CPU_ISA")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    vnni = "avx512_vnni" in host.current().isa_flags and host.current().isa == "avx512"
    assert cpu_int8.isa(True) == ("avx512_vnni" if vnni else host.current().isa)
