"""The Pallas kernels (Triton and TPU) called directly with small tiles (several and ragged
ones, of every block class) against ``math``, forward and gradients: dense masks, dropout, dtypes,
odd head dims, structured masks and score_mods. test_conformance.py runs them through the public
API on the cases every kernel shares.

On cpu they run in Pallas interpret mode (the TPU kernel under the TPU interpreter, which fills
out-of-bounds block reads with NaN); the tests marked ``gpu``/``tpu`` run the same cases
compiled on real hardware.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import transformax as tfx
from transformax.attention import api
from transformax.attention.backends import math as math_kernel
from transformax.attention.backends import pallas_common, pallas_tpu, pallas_triton
from transformax.attention.problem import Extras, Problem

KERNELS = {
    "triton": (pallas_triton, pallas_triton.Config(16, 16, 4, 1, 16, 16, 16, 16, 4, 1)),
    "tpu": (pallas_tpu, pallas_tpu.Config(16, 16, 16, 16)),
}


def _on(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def problem(*, b=1, hq=2, hk=2, lq=32, s=48, e=16, ev=None, dtype=jnp.float32, causal=None,
            mask=None, dropout=0.0) -> Problem:
    mask_dtype, mask_shape = (None, None) if mask is None else mask
    return Problem(b, hq, hk, lq, s, e, ev or e, np.dtype(dtype), 1.0 / np.sqrt(e), causal,
                   None if mask_dtype is None else np.dtype(mask_dtype), mask_shape, dropout)


# Each case covers tiles the kernels treat differently: ragged ends (16-row tiles), causal tiles
# hidden / partial / complete, rows that see nothing, GQA/MQA, padded head dims, dense masks,
# dropout. EXTRA_CASES repeat paths the first cases already take, in other combinations.
CASES = {
    "causal_gqa_ragged_dropout": problem(hq=4, hk=2, lq=40, s=56, causal=0, dropout=0.25),
    "bool_mask_mqa_odd_dims": problem(b=2, hk=1, lq=33, s=40, e=24, ev=40,
                                      mask=(bool, (2, 1, 33, 40))),
    "float_mask_bf16": problem(s=48, e=32, dtype=jnp.bfloat16, mask=(np.float32, (1, 2, 1, 48))),
    # A float mask per row and ragged last query/key tiles: the rows past the end must not
    # reach dk/dv (the TPU interpreter reads them as NaN).
    "float_row_mask_ragged": problem(lq=40, s=56, mask=(np.float32, (1, 2, 40, 56))),
}
EXTRA_CASES = {  # slow: their features are also in the default cases and test_conformance
    "hidden_rows": problem(lq=48, s=40, causal=-20),
    "bottom_right": problem(lq=24, s=56, causal=32),
    "dropout_mqa": problem(hq=4, hk=1, lq=32, s=40, dropout=0.25),
    "f16_full_tiles": problem(lq=32, s=64, e=32, dtype=jnp.float16),
}
TOLERANCE = {np.dtype(jnp.float32): 2e-5, np.dtype(jnp.bfloat16): 3e-2,
             np.dtype(jnp.float16): 4e-3}


def operands(p: Problem, seed: int = 0):
    """Random q, k, v, the dense mask and dropout seed ``p`` asks for, and two spare keys."""
    keys = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(keys[0], (p.batch, p.q_heads, p.q_len, p.head_dim), p.dtype)
    k = jax.random.normal(keys[1], (p.batch, p.kv_heads, p.kv_len, p.head_dim), p.dtype)
    v = jax.random.normal(keys[2], (p.batch, p.kv_heads, p.kv_len, p.v_head_dim), p.dtype)
    mask = None
    if p.mask_is_bool:
        mask = jax.random.bernoulli(keys[3], 0.7, p.mask_shape).at[:, :, 3:5].set(False)
    elif p.has_mask:
        mask = jax.random.normal(keys[3], p.mask_shape, p.mask_dtype)
        mask = mask.at[..., 5:9].set(-jnp.inf)
    seed_bits = jax.random.bits(keys[4], (2,), jnp.uint32) if p.has_dropout else None
    return q, k, v, Extras(mask, seed_bits), keys[5:7]


def flex(mask, score_mod=None, b=2, hq=2, hk=1, lq=40, s=56, e=16):
    """A structured-mask / score_mod case as ``tfx.flex_attention`` hands it to the kernels:
    ``(Problem, operands)``."""
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (b, hq, lq, e))
    k, v = (jax.random.normal(key, (b, hk, s, e)) for key in keys[1:3])
    call = api._Call(q, k, v, mask, 0.0, False, None, True, None, score_mod=score_mod)
    return call.problem, (call.q, call.k, call.v, call.extras, keys[3:])


def check_against_math(p: Problem, module, config=None, interpret=None, inputs=None):
    """``module``'s forward and backward (incl. the score_mod's captured-array gradients)
    against the math kernel's; rows that see no key give zeros and finite gradients. Returns
    where those rows are."""
    q, k, v, extras, (kd, kl) = inputs or operands(p)
    forward = jax.jit(lambda *a: module.forward(p, *a, config=config, interpret=interpret))
    backward = jax.jit(lambda *a: module.backward(p, *a, config=config, interpret=interpret))
    out, lse = forward(q, k, v, extras)
    want_out, want_lse = jax.jit(lambda *a: math_kernel.forward(p, *a))(q, k, v, extras)
    tol = TOLERANCE[p.dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                               atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)

    dout = jax.random.normal(kd, out.shape, p.dtype)
    dlse = jax.random.normal(kl, lse.shape, jnp.float32)
    dq, dk, dv, dconsts = backward(q, k, v, extras, out, lse, dout, dlse)
    want = jax.jit(lambda *a: math_kernel.backward(p, *a))(q, k, v, extras, want_out, want_lse,
                                                           dout, dlse)
    grads, wanted = (dq, dk, dv, *dconsts), (*want[:3], *want[3])
    assert len(grads) == len(wanted)
    for name, got, ref in zip(["dq", "dk", "dv", "dconsts"], grads, wanted):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) or 1.0
        np.testing.assert_allclose(np.asarray(got, np.float32) / scale,
                                   np.asarray(ref, np.float32) / scale, atol=4 * tol, rtol=0,
                                   err_msg=name)

    hidden = np.asarray(want_lse) == -np.inf
    assert np.all(np.asarray(out)[hidden] == 0) and np.all(np.asarray(lse)[hidden] == -np.inf)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    return hidden


# Structured masks and score_mods over 16 x 16 tiles of 40 queries and 56 keys: block classes
# per batch (documents, a per-row band) and per head (a block mask), EMPTY / PARTIAL / FULL
# tiles, rows that see nothing, score_mods with and without captured arrays.
DOCS = jnp.array([[0] * 16 + [1] * 18 + [7] * 6, [0] * 5 + [1] * 35])  # document 7: no keys
KV_DOCS = jnp.array([[0] * 16 + [1] * 40, [0] * 8 + [1] * 48])
SLOPES = jnp.array([0.5, 2.0])


def _alibi(s, b, h, q, kv):
    return s + SLOPES[h] * (kv - q) / 16


def _softcap(s, b, h, q, kv):
    return 4.0 * jnp.tanh(s / 4.0)


BIAS = jnp.linspace(-1.0, 1.0, 40 + 56)


def _relative_bias(s, b, h, q, kv):
    return s + BIAS[kv - q + 40]


def _documents_mod(b, h, q, kv):  # rows see several spans: evaluated per tile, not intervals
    return (DOCS[b][jnp.minimum(q, 39)] == KV_DOCS[b, kv]) | (kv % 9 == 0)


OFFSETS = jnp.array([0, 9])


def _offset_mod(b, h, q, kv):  # reads OFFSETS[b]: a scalar load (TPU: from SMEM)
    return (kv <= q + OFFSETS[b]) | (kv % 7 == 0)


STRUCTURED = {
    "relative_bias_documents_mod": lambda: flex(
        tfx.create_block_mask(_documents_mod, 2, None, 40, 56, BLOCK_SIZE=8), _relative_bias),
    "documents_window_alibi": lambda: flex(
        tfx.document_mask(DOCS, KV_DOCS) & tfx.sliding_window(40, 56, 40, lower_right=True),
        _alibi),
    "offset_mod_alibi": lambda: flex(
        tfx.create_block_mask(_offset_mod, 2, None, 40, 56, BLOCK_SIZE=8), _alibi),
    "block_mask_band_softcap": lambda: flex(
        tfx.create_block_mask(lambda b, h, q, kv: (kv <= q + 16) & (q - kv < 12 + 20 * h), None,
                              2, 40, 56, BLOCK_SIZE=8)
        & tfx.band(40, 56, None, 0, offset=jnp.array([3, 16])), _softcap),
}


@pytest.mark.parametrize("case, kernel", [
    ("relative_bias_documents_mod", "triton"), ("documents_window_alibi", "tpu"),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [
        ("documents_window_alibi", "triton"), ("block_mask_band_softcap", "tpu"),
        ("block_mask_band_softcap", "triton"), ("offset_mod_alibi", "tpu"),
        ("offset_mod_alibi", "triton")])])
def test_structured_interpret(case, kernel):
    """Triton reads the captured arrays at per-element positions (vector loads), the TPU kernel
    at (b, h) positions from SMEM."""
    p, inputs = STRUCTURED[case]()
    assert p.structured and p.score_fn is not None
    module, config = KERNELS[kernel]
    interpret = pltpu.InterpretParams() if kernel == "tpu" else True
    hidden = check_against_math(p, module, config, interpret, inputs)
    if case == "documents_window_alibi":
        assert hidden.any() and (~hidden).any()


INTERPRETED = {**CASES, **EXTRA_CASES}
# By default each case runs on one kernel (the TPU one takes the per-row float mask, its own
# reported bug); the other kernel, and the extra cases, run with the slow tests.
DEFAULT_KERNEL = {"causal_gqa_ragged_dropout": "triton", "bool_mask_mqa_odd_dims": "tpu",
                  "float_mask_bf16": "triton", "float_row_mask_ragged": "tpu"}


def interpret_params(kernel):
    return [c if DEFAULT_KERNEL.get(c) == kernel else pytest.param(c, marks=pytest.mark.slow)
            for c in INTERPRETED]


@pytest.mark.parametrize("case", interpret_params("triton"))
def test_triton_interpret(case):
    check_against_math(INTERPRETED[case], pallas_triton, KERNELS["triton"][1], interpret=True)


@pytest.mark.parametrize("case", interpret_params("tpu"))
def test_tpu_interpret(case):
    check_against_math(INTERPRETED[case], pallas_tpu, KERNELS["tpu"][1],
                       interpret=pltpu.InterpretParams())


@pytest.mark.slow
def test_tpu_per_row_float_mask_default_tiles():
    """The reported case: default 512-row tiles, a ragged last query tile, a mask per row."""
    check_against_math(problem(lq=600, s=640, mask=(np.float32, (1, 2, 600, 640))), pallas_tpu,
                       interpret=pltpu.InterpretParams())


cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="selection on cpu (run with JAX_PLATFORMS=cpu)")


def test_reasons(monkeypatch):
    monkeypatch.delenv(pallas_common.INTERPRET_ENV, raising=False)
    base = EXTRA_CASES["hidden_rows"]
    for module in (pallas_triton, pallas_tpu):
        assert module.reasons_unsupported(base, "cpu") == [
            "runs on cpu only in Pallas interpret mode (TRANSFORMAX_PALLAS_INTERPRET=1)"]
    assert pallas_triton.reasons_unsupported(base, "cuda") == []
    assert pallas_tpu.reasons_unsupported(base, "tpu") == []
    wide = dataclasses.replace(base, head_dim=320, dtype=np.dtype(jnp.float64))
    assert pallas_triton.reasons_unsupported(wide, "cuda") == [
        "dtype float64 is not supported (float16, bfloat16, float32)",
        "head dim E=320 is larger than 256"]
    half = dataclasses.replace(base, dtype=np.dtype(jnp.float16))
    assert pallas_tpu.reasons_unsupported(half, "tpu") == [
        "dtype float16 is not supported on tpu (bfloat16, float32)"]


def test_captured_arrays_by_kernel(monkeypatch):
    """Triton runs hooks that index captured arrays anywhere; Mosaic where they read one element
    per (b, h) (SMEM), interpret mode everything."""
    monkeypatch.setenv(pallas_common.INTERPRET_ENV, "1")
    gathers, alibi = (STRUCTURED[c]()[0] for c in ("relative_bias_documents_mod",
                                                   "offset_mod_alibi"))
    assert pallas_triton.reasons_unsupported(gathers, "cuda") == []
    assert pallas_tpu.reasons_unsupported(alibi, "tpu") == []
    assert pallas_tpu.reasons_unsupported(gathers, "cpu") == []
    assert pallas_tpu.reasons_unsupported(gathers, "tpu") == [
        f"its {name} reads a captured array at per-element positions (a vector gather), "
        f"which the Pallas tpu lowering does not support" for name in ("mask_mod", "score_mod")]


@cpu_only
def test_sdpa_without_interpret_mode_names_the_switch(monkeypatch):
    monkeypatch.delenv(pallas_common.INTERPRET_ENV, raising=False)
    q = jnp.ones((1, 2, 8, 16))
    with tfx.sdpa_kernel([tfx.Backend.PALLAS_TRITON]), pytest.raises(RuntimeError) as err:
        tfx.sdpa(q, q, q)
    assert "pallas_triton: cannot run: runs on cpu only in Pallas interpret mode" in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("block_q", 48, "block_q=48 must be a power of two >= 16 (Triton tiles)"),
    ("block_k_dq", 8, "block_k_dq=8 must be a power of two >= 16 (Triton tiles)"),
    ("num_warps", 6, "num_warps=6 must be a power of two"),
    ("bwd_stages", 0, "bwd_stages=0 must be a positive int"),
])
def test_triton_config_validates(field, value, message):
    with pytest.raises(ValueError) as err:
        pallas_triton.Config(**{field: value})
    assert str(err.value) == f"pallas_triton.Config: {message}"


def _dot_precisions(p: Problem) -> set[str]:
    q, k, v, *_ = operands(p)
    jaxpr = str(jax.make_jaxpr(
        lambda q, k, v: pallas_triton.forward(p, q, k, v, Extras(), interpret=False))(q, k, v))
    return set(re.findall(r"precision=\(Precision\.(\w+)", jaxpr))


def test_triton_f32_multiplies_in_full_precision_unless_asked():
    """The compiled (GPU) kernel: f32 dots are IEEE like torch's default, not TF32; bf16 ones set
    no precision; ``jax.default_matmul_precision`` opts in to TF32 (HIGH)."""
    f32 = EXTRA_CASES["hidden_rows"]
    assert _dot_precisions(f32) == {"HIGHEST"}
    assert _dot_precisions(dataclasses.replace(f32, dtype=np.dtype(jnp.bfloat16))) == set()
    with jax.default_matmul_precision("tensorfloat32"):
        assert _dot_precisions(f32) == {"HIGH"}


def test_triton_lowering_failure_is_a_reason(monkeypatch):
    """A GPU that jax's Triton lowering rejects (e.g. one missing from its GPU table) makes the
    kernel ineligible with the error as its reason, and selection falls through."""
    def unknown_gpu(x_ref, o_ref):
        raise KeyError("'NVIDIA L40S' is not in the GPU info table")

    monkeypatch.setattr(pallas_common, "cuda_capability", lambda: (8, 9))
    monkeypatch.setattr(pallas_triton, "_probe_kernel", unknown_gpu)
    pallas_triton.lowering_error.cache_clear()
    try:
        reasons = pallas_triton.reasons_unsupported(EXTRA_CASES["hidden_rows"], "cuda")
        q = jnp.ones((1, 2, 32, 16))
        chosen = tfx.explain(q, q, q).chosen("cuda")
    finally:
        pallas_triton.lowering_error.cache_clear()
    assert reasons == ["jax's Pallas Triton lowering fails on this GPU: \"'NVIDIA L40S' is not "
                       "in the GPU info table\""]
    assert chosen not in (None, tfx.Backend.PALLAS_TRITON)


# --- on real hardware -------------------------------------------------------------------------

LARGE = {
    "bf16_hd128_causal": problem(b=2, hq=8, hk=2, lq=1000, s=1000, e=128, dtype=jnp.bfloat16,
                                 causal=0),
    "bf16_hd64_mask": problem(b=2, hq=4, hk=4, lq=512, s=777, e=64, dtype=jnp.bfloat16,
                              mask=(bool, (2, 1, 512, 777))),
    "f16_hd256_dropout": problem(b=1, hq=4, hk=1, lq=300, s=520, e=256, ev=256,
                                 dtype=jnp.float16, dropout=0.1, causal=220),
    "f32_hd96": problem(b=1, hq=2, hk=2, lq=200, s=333, e=96, dtype=jnp.float32),
}


ON_DEVICE = {**INTERPRETED, **LARGE}


def _reference_precision():
    return jax.default_matmul_precision("highest")


@pytest.mark.gpu
@pytest.mark.skipif(not _on("gpu"), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case, config", [*((c, "default") for c in ON_DEVICE),
                                          *((c, "small") for c in CASES)])
def test_triton_gpu(case, config):
    with _reference_precision():
        check_against_math(ON_DEVICE[case], pallas_triton,
                           None if config == "default" else KERNELS["triton"][1])


@pytest.mark.tpu
@pytest.mark.skipif(not _on("tpu"), reason="needs a TPU")
@pytest.mark.parametrize("case", [c for c, p in ON_DEVICE.items() if p.dtype != jnp.float16])
def test_tpu_kernel_on_tpu(case):
    with _reference_precision():
        check_against_math(ON_DEVICE[case], pallas_tpu)


@pytest.mark.gpu
@pytest.mark.skipif(not _on("gpu"), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("config", ["default", "small"])
@pytest.mark.parametrize("case", ["block_mask_band_softcap", "relative_bias_documents_mod"])
def test_triton_gpu_structured(config, case):
    p, inputs = STRUCTURED[case]()
    with _reference_precision():
        check_against_math(p, pallas_triton, None if config == "default" else KERNELS["triton"][1],
                           inputs=inputs)


@pytest.mark.tpu
@pytest.mark.skipif(not _on("tpu"), reason="needs a TPU")
@pytest.mark.parametrize("case", ["block_mask_band_softcap", "offset_mod_alibi"])
def test_tpu_structured_on_tpu(case):
    p, inputs = STRUCTURED[case]()
    with _reference_precision():
        check_against_math(p, pallas_tpu, inputs=inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not _on("gpu"), reason="needs an NVIDIA GPU")
def test_sdpa_on_gpu_chooses_triton():
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (2, 8, 300, 64), jnp.bfloat16) for key in keys)
    assert tfx.explain(q, k, v, is_causal=True).chosen("cuda") == tfx.Backend.PALLAS_TRITON

    def loss(q, k, v):
        return jnp.sum(tfx.sdpa(q, k, v, is_causal=True).astype(jnp.float32) ** 2)

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    with tfx.sdpa_kernel([tfx.Backend.MATH]), _reference_precision():
        want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32) / np.abs(w).max(), w / np.abs(w).max(),
                                   atol=3e-2)
