"""Every int8 matmul kernel against dequantize-then-matmul written here in NumPy (and torch's
per-tensor activation quantization); selection, ``quant.kernel`` and ``explain``."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from transformax import host, nn, quant, tuning
from transformax.quant import tune
from transformax.quant.kernels import cpu_int8, pallas_triton
from transformax.quant.problem import Problem

M, K, N = 8, 64, 48
RNG = np.random.RandomState(0)
W = RNG.standard_normal((K, N)).astype(np.float32)
X = (RNG.standard_normal((M, K)) * np.linspace(0.1, 10, M)[:, None] + 0.5).astype(np.float32)
linear = jax.jit(nn.linear)
NATIVE = not cpu_int8.reasons_unsupported(Problem.of(jnp.asarray(X), quant.quantize(
    {"w": jnp.asarray(W)}, "int8-weight")["w"]), "cpu")

RECIPES = {
    "dynamic": quant.Recipe(activations="dynamic"),
    "dynamic-asym": quant.Recipe(activations="dynamic", act_symmetric=False),
    "dynamic-tensor": quant.Recipe(activations="dynamic", act_granularity="tensor"),
    "dynamic-wtensor": quant.Recipe(activations="dynamic", weight_granularity="tensor"),
    "weight": quant.Recipe(),
    "weight-group": quant.Recipe(weight_granularity="group", group_size=16),
    "int4": quant.Recipe(bits=4, weight_granularity="group", group_size=16),
    "int4-channel": quant.Recipe(bits=4),
}


def quantize_rows(x, symmetric, per_token):
    """NumPy activation fake-quantization: int8 round-to-nearest, per token or per tensor."""
    axis, keep = (1, True) if per_token else (None, False)
    if symmetric:
        s = np.abs(x).max(axis, keepdims=keep) / 127
        return np.clip(np.round(x / s), -127, 127) * s
    lo, hi = np.minimum(x.min(axis, keepdims=keep), 0), np.maximum(x.max(axis, keepdims=keep), 0)
    s = (hi - lo) / 255
    z = np.round(-128 - lo / s)
    return (np.clip(np.round(x / s) + z, -128, 127) - z) * s


def reference(recipe, qw):
    w = np.asarray(qw.dequantize(), np.float64)
    if recipe.activations == "none":
        return X @ w
    return quantize_rows(X, recipe.act_symmetric, recipe.act_granularity == "token") @ w


def eligible_on_cpu(qw):
    rows = quant.explain(X, qw).rows
    return [v.kernel for v in rows if v.platform == "cpu" and not v.reasons]


def error_bound(kernel, recipe, ref):
    """The largest ``|kernel - reference|`` allowed: float32 rounding, plus the kernel's own
    rounding of float (weight-only) activations: two int8 digits per token (``xla_int8x2``:
    at most ``max|x_row| / (127 * 508)`` per value) or bfloat16 (``xla_bf16``: ``2^-9 |x|``)."""
    bound = 2e-5 * (np.abs(ref) + np.abs(ref).max())
    if recipe.activations == "none":
        w = np.abs(np.asarray(qw_of(recipe).dequantize(), np.float64))
        x = np.abs(X.astype(np.float64))
        if kernel == quant.Kernel.XLA_INT8X2:
            bound += x.max(1, keepdims=True) / (127 * 508) * w.sum(0)
        if kernel == quant.Kernel.XLA_BF16:
            bound += 2.0 ** -9 * (x @ w)
    return bound


def qw_of(recipe):
    return quant.quantize({"w": jnp.asarray(W)}, recipe)["w"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_kernel_matches_dequantize_then_matmul(name, monkeypatch):
    """Pallas Triton interpreted on cpu too. (``quant.kernel`` retraces the jitted ``linear``.)"""
    monkeypatch.setenv(pallas_triton.pc.INTERPRET_ENV, "1")
    recipe = RECIPES[name]
    qparams = {"w": qw_of(recipe)}
    kernels = eligible_on_cpu(qparams["w"])
    assert quant.Kernel.DEQUANT in kernels
    integer = recipe.weight_granularity != "group"
    assert (quant.Kernel.XLA_INT8 in kernels) == (recipe.activations != "none" and integer)
    assert (quant.Kernel.XLA_INT8X2 in kernels) == (recipe.activations == "none")
    assert (quant.Kernel.PALLAS_TRITON in kernels) == (integer and recipe.bits == 8)
    assert (quant.Kernel.CPU_INT8 in kernels) == (integer and recipe.bits == 8 and NATIVE)
    assert (quant.Kernel.CPU_INT4 in kernels) == (recipe.bits == 4 and NATIVE)
    ref = reference(recipe, qparams["w"])
    for k in kernels:
        with quant.kernel([k]):
            y = np.asarray(linear(qparams, jnp.asarray(X)))
            one = np.asarray(linear(qparams, jnp.asarray(X[1])))  # a single row (decoding)
        bound = error_bound(k, recipe, ref)
        assert np.all(np.abs(y - ref) <= bound), (k, np.abs(y - ref).max(), bound.min())
        if recipe.act_granularity == "token":  # a per-tensor scale depends on the other rows
            np.testing.assert_allclose(one, y[1], rtol=2e-5, atol=2e-5 * np.abs(ref).max())
        assert not np.allclose(y, X @ W, rtol=1e-4, atol=1e-4)  # int8 weights, not the floats


def test_per_tensor_asymmetric_activations_match_torch():
    recipe = quant.Recipe(activations="dynamic", act_granularity="tensor", act_symmetric=False)
    qparams = quant.quantize({"w": jnp.asarray(W)}, recipe)
    xq = torch.quantize_per_tensor_dynamic(torch.from_numpy(X), torch.quint8, False)
    ref = xq.dequantize().double().numpy() @ np.asarray(qparams["w"].dequantize(), np.float64)
    np.testing.assert_allclose(linear(qparams, jnp.asarray(X)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


def test_jit_matches_eager_and_keeps_shape_and_dtype():
    qparams = quant.quantize({"w": jnp.asarray(W), "b": jnp.ones(N)}, "int8-dynamic")
    x = jnp.asarray(X.reshape(2, 4, K))
    assert qparams["w"].name == "<root>"
    with jax.disable_jit():
        eager = nn.linear(qparams, x)
    jitted = linear(qparams, x)
    assert jitted.shape == (2, 4, N) and jitted.dtype == jnp.float32
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-5)
    assert linear({"w": qparams["w"]}, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    np.testing.assert_array_equal(nn.linear(qparams, np.asarray(x)), eager)  # NumPy input


@pytest.mark.parametrize("name", ["weight", "dynamic-asym"])
def test_pallas_triton_jit_matches_eager(name, monkeypatch):
    """Pallas interpreted op by op (eager) and compiled (jit): weight-only, and int8
    activations with a zero point."""
    monkeypatch.setenv(pallas_triton.pc.INTERPRET_ENV, "1")
    qparams = {"w": qw_of(RECIPES[name])}
    with quant.kernel([quant.Kernel.PALLAS_TRITON]):
        with jax.disable_jit():
            eager = nn.linear(qparams, jnp.asarray(X))
        np.testing.assert_allclose(linear(qparams, jnp.asarray(X)), eager, rtol=1e-6,
                                   atol=1e-6 * np.abs(eager).max())


def test_selection_explain_and_kernel_context():
    qw = quant.quantize({"w": jnp.asarray(W)}, "int8-dynamic")["w"]
    e = quant.explain(X, qw)
    assert e.chosen("cpu") == e.chosen("tpu") == quant.Kernel.XLA_INT8
    text = str(e)
    if NATIVE:  # cpu_int8 runs int8 activations of one row (decoding) unless measured
        limit = cpu_int8.row_limit(Problem.of(jnp.asarray(X), qw))[0]
        assert f"xla_int8       chosen (host default: 8 rows, cpu_int8 runs up to {limit}" in text
        assert quant.explain(X[:1], qw).chosen("cpu") == quant.Kernel.CPU_INT8
    assert "int8 matmul '<root>': (8, 64) @ (64, 48)" in text
    assert ("pallas_triton  cannot run: runs on cpu only in Pallas interpret mode "
            "(TRANSFORMAX_PALLAS_INTERPRET=1)") in text
    assert "cuda:\n  pallas_triton  chosen (priority)" in text
    with quant.kernel(["dequant", "xla_bf16"], set_priority=True):
        assert quant.explain(X, qw).chosen("cpu") == quant.Kernel.DEQUANT
    with quant.kernel("xla_bf16"):
        e = quant.explain(X, qw)
        assert e.chosen("cpu") == quant.Kernel.XLA_BF16
        assert "xla_int8       excluded by quant.kernel" in str(e)
    weight_only = quant.quantize({"w": jnp.asarray(W)}, "int8-weight")
    with quant.kernel(["xla_int8"]), pytest.raises(
            RuntimeError, match=r"(?s)no kernel can run it on cpu:\n.*xla_int8: cannot run: "
                                r"weight-only recipe"):
        nn.linear(weight_only, jnp.asarray(X))


@pytest.mark.parametrize("kernels, message", [
    (["cutlass"], r"quant.kernel: kernels must be quant.Kernel values.*'cutlass'"),
    ([], "quant.kernel: kernels is empty"),
])
def test_kernel_context_errors(kernels, message):
    with pytest.raises(ValueError, match=message), quant.kernel(kernels):
        pass


def test_measured_choice_from_the_tuning_cache_and_autotuning():
    qw = quant.quantize({"w": jnp.asarray(W)}, "int8-dynamic")["w"]
    problem = Problem.of(jnp.asarray(X), qw)
    tuning.store(f"{tune.NAME}/fwd/{tune.problem_class(problem)}", tune.Pick("xla_bf16"))
    e = quant.explain(X, qw)
    assert e.chosen("cpu") == quant.Kernel.XLA_BF16 and e.chosen("tpu") == quant.Kernel.XLA_INT8
    assert "xla_bf16       chosen (cache)" in str(e)
    with quant.kernel(["xla_int8", "dequant"]):  # a cached choice that is excluded: priority
        assert "xla_int8       chosen (priority)" in str(quant.explain(X, qw))
    with quant.kernel(["dequant", "xla_bf16"], set_priority=True):  # the caller's order wins
        assert quant.explain(X, qw).chosen("cpu") == quant.Kernel.DEQUANT
    one_row = Problem.of(jnp.asarray(X[:1]), qw)  # another problem class: timed and cached
    with tuning.autotuning():
        e = quant.explain(X[:1], qw)
    assert "chosen (tuned)" in str(e)
    assert tuning.load_cache()[f"{tune.NAME}/fwd/{tune.problem_class(one_row)}"] == {
        "kernel": e.chosen("cpu").value}


AVX512 = ("avx512f", "avx512dq", "avx512bw", "avx512vl")


@pytest.mark.parametrize("flags, rows, chosen", [
    ((*AVX512, "amx_bf16"), 1024, "xla_bf16"),
    ((*AVX512, "amx_bf16"), 512, "xla_int8x2"),
    (AVX512, 1024, "xla_int8x2"),
    (("avx2", "fma", "avx512_bf16"), 1024, "xla_int8x2"),
])
def test_weight_only_host_default(monkeypatch, flags, rows, chosen):
    """Unmeasured, a weight-only product of over 512 rows runs in bf16 on an AVX-512 host with
    bf16 instructions; otherwise in the two-digit int8 kernel (the first by priority)."""
    for var in ("XLA_FLAGS", "TRANSFORMAX_CPU_ISA"):  # the ISA the flags say, not emulated
        monkeypatch.delenv(var, raising=False)
    machine = dataclasses.replace(host.current(), isa_flags=flags)
    monkeypatch.setattr(tune.host, "current", lambda: machine)
    qw = quant.quantize({"w": jnp.asarray(W)}, "int8-weight")["w"]
    e = quant.explain(np.zeros((rows, K), np.float32), qw)
    source = "host default: weight-only, more than 512" if chosen == "xla_bf16" else "priority)"
    assert f"{chosen:<14} chosen ({source}" in str(e)


def test_pallas_triton_lowers_to_triton_for_cuda():
    """Without a GPU: the kernel lowers for cuda through jax's Triton lowering (bf16
    activations, int8 ones with a zero point, and weight-only)."""
    x = jnp.asarray(X, jnp.bfloat16)
    for recipe in (RECIPES["dynamic-asym"], RECIPES["weight"]):
        qw = qw_of(recipe)
        problem = Problem.of(x, qw)
        hlo = jax.jit(functools.partial(pallas_triton.matmul, problem)).trace(x, qw).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in hlo and "transformax_int8_matmul" in hlo
    assert pallas_triton.default_config(problem) == pallas_triton.Config(
        block_m=16, block_n=64, block_k=64)  # (8, 64) @ (64, 48)
