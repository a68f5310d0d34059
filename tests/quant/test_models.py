"""Quantized models: Hugging Face GPT-2 against torch's ``quantize_dynamic``, ``apply`` /
``apply_cached`` / ``generate`` unchanged on quantized params, static calibration, orbax."""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from transformax import generate, nn, quant
from transformax.models import gpt, llama

HF_CFG = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
              eos_token_id=0)
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 16)).astype(np.int32)
apply = jax.jit(lambda module, params, tokens, cfg: module.apply(params, tokens, cfg),
                static_argnums=(0, 3))
apply_cached = jax.jit(lambda module, *args: module.apply_cached(*args), static_argnums=(0, 3))


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CFG)).eval()
    _, params, cfg = gpt.from_hf(model)
    return model, params, cfg


def torch_linears(model):
    """A copy of a GPT-2 with its ``Conv1D`` layers as ``nn.Linear`` (what ``quantize_dynamic``
    quantizes)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "Conv1D":
                linear = torch.nn.Linear(*child.weight.shape)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return model


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_gpt2_logits_close_to_torch_quantize_dynamic(hf_gpt2, engine):
    """Both quantize the block linears (the tied head stays f32). torch: per-tensor weights,
    per-tensor asymmetric 8-bit (x86: 7-bit) activations; ours: per-channel weights, per-token
    activations. Each differs from the f32 logits by its own rounding error, so: ours must be no
    less accurate than torch's (relative Frobenius error vs the f32 model), and ours and torch's
    must agree within twice torch's largest absolute error."""
    model, params, cfg = hf_gpt2
    torch.backends.quantized.engine = engine
    linears = torch_linears(model)
    names = {n for n, m in linears.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq = torch.ao.quantization.quantize_dynamic(linears, names, dtype=torch.qint8)
    with torch.no_grad():
        ids = torch.as_tensor(TOKENS, dtype=torch.long)
        ref, theirs = model(ids).logits.numpy(), tq(ids).logits.numpy()
    ours = np.asarray(apply(gpt, quant.quantize(params, "int8-dynamic"), jnp.asarray(TOKENS), cfg))
    assert 0 < rel(ours, ref) <= rel(theirs, ref)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2 * np.abs(theirs - ref).max())


def test_cached_decoding_and_generate_run_on_quantized_params(hf_gpt2):
    """Per-token activation scales make a token's logits independent of the others, so the KV
    cache path gives the full forward's logits, and greedy ``generate`` follows them."""
    _, params, cfg = hf_gpt2
    qparams = quant.quantize(params, "int8-dynamic")
    tokens = jnp.asarray(TOKENS)
    full = apply(gpt, qparams, tokens, cfg)
    cache = gpt.init_cache(cfg, 2, 16)
    # jitted: op by op, the two calls compile each op of the quantized model twice (~6 s)
    first, cache = apply_cached(gpt, qparams, tokens[:, :10], cfg, cache)
    rest, _ = apply_cached(gpt, qparams, tokens[:, 10:], cfg, cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, rtol=1e-4, atol=1e-4)
    # the call of test_cli's (one compilation for both)
    new = generate.generate(gpt, qparams, cfg, TOKENS[:1, :8], max_new_tokens=6, temperature=0,
                            eos_id=95, pad_id=-1)
    np.testing.assert_array_equal(new[:, 0], jnp.argmax(apply(gpt, qparams, tokens[:1, :8], cfg)
                                                        [:, -1], -1))


def test_llama_with_untied_head():
    cfg = llama.Config(vocab_size=96, n_layer=1, n_head=4, n_kv_head=2, dim=32, hidden_dim=64,
                       max_seq_len=32, tie_embeddings=False)
    params = jax.jit(llama.init, static_argnums=1)(jax.random.key(0), cfg)
    qparams = quant.quantize(params, "int8-weight")
    assert isinstance(qparams["lm_head"]["w"], quant.QuantizedWeight)
    ref = apply(llama, params, jnp.asarray(TOKENS), cfg)
    assert 0 < rel(apply(llama, qparams, jnp.asarray(TOKENS), cfg), ref) < 0.02


CAL = [np.random.RandomState(i).standard_normal((6, 16)).astype(np.float32) * (i + 1) + i
       for i in range(2)]
LAYER = {"fc": {"w": jnp.asarray(np.random.RandomState(9).standard_normal((16, 8)),
                                 jnp.float32)}}


@pytest.mark.parametrize("observer, symmetric", [("minmax", True), ("percentile", False)])
def test_static_calibration(observer, symmetric):
    recipe = quant.Recipe(activations="static", observer=observer, act_symmetric=symmetric,
                          percentile=99.0)
    fn = jax.jit(lambda p, x: nn.linear(p["fc"], x))
    qw = quant.quantize(LAYER, recipe, calibration=(fn, CAL))["fc"]["w"]
    if observer == "minmax":
        lo, hi = min(x.min() for x in CAL), max(x.max() for x in CAL)
    else:
        lo = np.mean([np.percentile(x, 1.0) for x in CAL])
        hi = np.mean([np.percentile(x, 99.0) for x in CAL])
    if symmetric:
        scale, zero = max(-lo, hi) / 127, 0
    else:
        scale = (max(hi, 0) - min(lo, 0)) / 255
        zero = np.round(-128 - min(lo, 0) / scale)
    np.testing.assert_allclose(qw.act_scale, scale, rtol=1e-5)
    assert (qw.act_zero is None) == symmetric and (symmetric or int(qw.act_zero) == zero)
    x = CAL[1]
    xq = np.clip(np.round(x / scale) + zero, -128 if zero else -127, 127)
    ref = ((xq - zero) * scale) @ np.asarray(qw.dequantize(), np.float64)
    np.testing.assert_allclose(fn({"fc": {"w": qw}}, jnp.asarray(x)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


def test_static_calibration_errors():
    fn = lambda p, x: nn.linear(p["fc"], x)  # noqa: E731
    with pytest.raises(ValueError, match="calibration=.* is needed by, and only by, "
                                         "activations='static'"):
        quant.quantize(LAYER, "int8-static")
    with pytest.raises(ValueError, match="recipe activations='dynamic'"):
        quant.quantize(LAYER, "int8-dynamic", calibration=(fn, CAL))
    with pytest.raises(TypeError, match=r"calibration must be a \(fn, batches\) pair"):
        quant.quantize(LAYER, "int8-static", calibration=CAL)
    two = {**LAYER, "head": LAYER["fc"]}
    with pytest.raises(ValueError, match=r"calibration never ran layers \['head'\]"):
        quant.quantize(two, "int8-static", calibration=(fn, CAL))


def test_orbax_save_restore(hf_gpt2, tmp_path):
    _, params, cfg = hf_gpt2
    qparams = quant.quantize(params, "int8-dynamic")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", qparams)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "q", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                             qparams))
    assert jax.tree.structure(restored) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(apply(gpt, restored, jnp.asarray(TOKENS), cfg),
                                  apply(gpt, qparams, jnp.asarray(TOKENS), cfg))
