"""The native x86 int8 and packed-int4 matmuls (``cpu_int8``, ``cpu_int4``) against
dequantize-then-matmul in NumPy: both code paths (the host's, and AVX2 as an emulated AVX2 host
runs it), ragged shapes, odd int4 group boundaries, all-zero groups, integer extremes, zero
rows, jit / eager, vmap; the reasons they cannot run, the fallback, and the row limits' source."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformax import host, native, nn, quant, tuning
from transformax.quant import tune
from transformax.quant.kernels import cpu_int4, cpu_int8
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
INT4 = {  # 65-row groups: a boundary inside a byte (rows 64 | 65); 10-row groups; per channel
    "group65": quant.Recipe(bits=4, weight_granularity="group", group_size=65),
    "group10": quant.Recipe(bits=4, weight_granularity="group", group_size=10),
    "channel": quant.Recipe(bits=4),
}


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


def run(qw, x, isa, monkeypatch, kernel=quant.Kernel.CPU_INT8):
    """``x @ qw`` on ``kernel`` with the ``isa`` code path (a fresh trace: the path is chosen
    when traced)."""
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", isa)
    with quant.kernel([kernel]):
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
@pytest.mark.parametrize("name", list(INT4))
def test_int4_matches_dequantize_then_matmul(name, isa, monkeypatch):
    """7 rows: a full row tile and a ragged one (AVX-512: 4 + 3; AVX2: 2 + 2 + 2 + 1); 1 row:
    decoding. Weight rows 10..19 all zero: a zero group (scale 1) with 10-row groups."""
    w = W.copy()
    w[10:20] = 0.0
    w[:, 7] *= 1e3  # a column of larger scales
    qw = quant.quantize({"w": jnp.asarray(w)}, INT4[name])["w"]
    assert qw.values.shape == (K // 2, N) and qw.bits == 4
    for rows in (1, 7):
        ref = reference(X[:rows], qw)
        y = run(qw, X[:rows], isa, monkeypatch, quant.Kernel.CPU_INT4)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert np.all(y[:, 5] == 0)
    if name == "group10":
        assert np.all(np.asarray(qw.scale)[1] == 1.0)  # the zero group


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
@pytest.mark.parametrize("recipe, kernel", [("int8-dynamic", quant.Kernel.CPU_INT8),
                                            (INT4["group65"], quant.Kernel.CPU_INT4),
                                            (INT4["group10"], quant.Kernel.CPU_INT4)])
def test_jit_matches_eager_zero_rows_and_vmap(recipe, kernel):
    """(int4: 65-row groups run on whole packed inputs, 10-row ones split by group.)"""
    qw = qw_of(recipe)
    x = jnp.asarray(X[:4])
    with quant.kernel([kernel]):
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


def test_reasons_they_cannot_run_and_the_fallback(monkeypatch):
    qw, q4 = qw_of("int8-weight"), qw_of(INT4["group65"])
    many = Problem.of(jnp.zeros((cpu_int8.MAX_ROWS + 1, K)), qw)
    assert f"{cpu_int8.MAX_ROWS + 1} rows: a kernel for at most {cpu_int8.MAX_ROWS}" in " ".join(
        cpu_int8.reasons_unsupported(many, "cpu"))
    one4 = Problem.of(jnp.zeros((1, K)), q4)
    reasons = " ".join(cpu_int8.reasons_unsupported(one4, "cpu"))
    assert "grouped weight scales" in reasons and "packed int4" in reasons
    assert "int8 weights: a kernel for packed int4 ones" in " ".join(
        cpu_int4.reasons_unsupported(Problem.of(jnp.zeros((1, K)), qw), "cpu"))
    monkeypatch.setattr(cpu_int8, "EXTENSION", native.load("_not_built", {}))
    for weight, fallback in ((qw, quant.Kernel.XLA_INT8X2), (q4, quant.Kernel.XLA_INT8X2)):
        e = quant.explain(X[:1], weight)
        kernel = "cpu_int4" if weight.bits == 4 else "cpu_int8"
        assert (f"{kernel:<14} cannot run: the native extension is not built (No module named "
                f"'transformax._not_built')") in str(e)
        assert e.chosen("cpu") == fallback  # the next by priority
    y = jax.jit(nn.linear)({"w": q4}, jnp.asarray(X[:1]))  # and it runs there
    ref = reference(X[:1], q4)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_row_limits_follow_the_host_and_the_tuning_cache(isa, monkeypatch):
    """Unmeasured, a native kernel runs up to its ISA's measured crossover, the next kernel
    beyond, and explain says so; a tuning-cache entry for the problem class overrides it."""
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", isa)
    for weight, kernel in ((qw_of("int8-weight"), "cpu_int8"), (qw_of(INT4["channel"]),
                                                                 "cpu_int4")):
        limit = cpu_int8.ROW_LIMITS[isa]["int4" if weight.bits == 4 else "weight-only"]
        product = "int4" if weight.bits == 4 else "weight-only"
        e = str(quant.explain(np.zeros((limit, K), np.float32), weight))
        assert (f"{kernel:<14} chosen (host default: up to {limit} rows for {product} on {isa} "
                f"hosts (measured crossover))") in e
        over = np.zeros((limit + 1, K), np.float32)
        e = quant.explain(over, weight)
        assert e.chosen("cpu") == quant.Kernel.XLA_INT8X2
        assert (f"xla_int8x2     chosen (host default: {limit + 1} rows, {kernel} runs up to "
                f"{limit} for {product}") in str(e)
        problem = Problem.of(jnp.asarray(over), weight)
        tuning.store(f"{tune.NAME}/fwd/{tune.problem_class(problem)}", tune.Pick(kernel))
        assert f"{kernel:<14} chosen (cache)" in str(quant.explain(over, weight))


def test_code_path_follows_the_emulated_isa(monkeypatch):
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", "avx2")
    assert cpu_int8.isa(True) == cpu_int8.isa(False) == "avx2"
    assert cpu_int8.row_limit(Problem.of(jnp.zeros((1, K)), qw_of("int8-weight")))[0] == 4
    monkeypatch.delenv("TRANSFORMAX_CPU_ISA")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    vnni = "avx512_vnni" in host.current().isa_flags and host.current().isa == "avx512"
    assert cpu_int8.isa(True) == ("avx512_vnni" if vnni else host.current().isa)


@needs_native
@pytest.mark.parametrize("w_rows, groups, message", [
    (K, 2, r"tfx int4 matmul: x must be \(M, K\) and w \(K / 2, N\)"),
    (K // 2, 3, r"tfx int4 matmul: scale must be float32 \(groups, N\), groups dividing K"),
])
def test_int4_handler_checks_its_operands(w_rows, groups, message):
    """The FFI handler's own checks (the Python side never passes such operands)."""
    call = jax.jit(lambda x, w, s: cpu_int8.native_call("tfx_cpu_int4", jnp.float32, None, x, w, s))
    with pytest.raises(Exception, match=message):
        call(jnp.zeros((1, K)), jnp.zeros((w_rows, N), jnp.int8), jnp.ones((groups, N)))
