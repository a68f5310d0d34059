import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from transformax.models import gpt

HF_CFG = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
              eos_token_id=0)
apply = jax.jit(gpt.apply, static_argnames=("cfg", "train"))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CFG)).eval()


@pytest.fixture(scope="module")
def converted(hf_model):
    return gpt.from_hf(hf_model)[1:]


def test_logits_match_hugging_face(hf_model, converted, tokens, hf_run):
    params, cfg = converted
    assert cfg.n_layer == 2 and cfg.n_head == 4 and cfg.block_size == 32
    ref = hf_run(hf_model, tokens).logits.numpy()
    np.testing.assert_allclose(apply(params, tokens, cfg), ref, atol=1e-4, rtol=1e-4)


def test_padding_mask_matches_hugging_face(hf_model, converted, tokens, padding, hf_run):
    params, cfg = converted
    ref = hf_run(hf_model, tokens, attention_mask=padding).logits.numpy()
    out = np.asarray(apply(params, tokens, cfg, attention_mask=padding))
    real = padding.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=1e-4)


def test_num_params_matches_hugging_face(hf_model, converted):
    assert gpt.num_params(converted[0]) == sum(p.numel() for p in hf_model.parameters())


def test_jit_parity(converted, tokens, padding, eager):
    params, cfg = converted
    np.testing.assert_allclose(apply(params, tokens, cfg, attention_mask=padding),
                               eager(gpt.apply, params, tokens, cfg, attention_mask=padding),
                               atol=1e-5, rtol=1e-5)


def test_init_shapes():
    cfg = gpt.Config(vocab_size=96, n_layer=2, n_head=4, n_embd=32, block_size=32)
    params = jax.eval_shape(lambda key: gpt.init(key, cfg), jax.random.key(0))
    assert params["wte"].shape == (96, 32) and params["wpe"].shape == (32, 32)
    assert params["blocks"][1]["attn"]["qkv"]["w"].shape == (32, 96)
    d, v, t, n = 32, 96, 32, 2
    assert gpt.num_params(params) == v * d + t * d + 2 * d + n * (12 * d * d + 13 * d)


def test_bf16_compute_close_to_f32(converted, tokens):
    """Documented tolerance: bf16 compute logits within 2% of the f32 logits' largest magnitude."""
    params, cfg = converted
    ref = apply(params, tokens, cfg)
    out = apply(params, tokens, dataclasses.replace(cfg, compute_dtype="bfloat16"))
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) <= 0.02 * float(jnp.abs(ref).max())


def test_bf16_params(converted, tokens):
    params, cfg = converted
    bf16 = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16",
                               output_dtype="bfloat16")
    shapes = jax.eval_shape(lambda key: gpt.init(key, bf16), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.eval_shape(lambda p: gpt.apply(p, tokens, bf16), params).dtype == jnp.bfloat16


def test_dropout_needs_rng_and_is_deterministic(converted, tokens):
    params, cfg = converted
    assert cfg.dropout == 0.1  # resid_pdrop of the Hugging Face config
    with pytest.raises(ValueError, match=r"train=True with dropout=0.1 needs rng="):
        gpt.apply(params, tokens, cfg, train=True)
    rng = jax.random.key(3)
    a = apply(params, tokens, cfg, train=True, rng=rng)
    np.testing.assert_array_equal(a, apply(params, tokens, cfg, train=True, rng=rng))
    assert not np.allclose(a, apply(params, tokens, cfg))


def test_from_state_dict_and_errors(hf_model, converted, tokens):
    params, cfg = converted
    state = hf_model.state_dict()
    _, p2, cfg2 = gpt.from_hf(state, config=hf_model.config)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, p2, params)
    with pytest.raises(ValueError, match="a state dict needs config="):
        gpt.from_hf(state)
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"missing tensors \[transformer.h.1.mlp.c_fc.bias\]"):
        gpt.from_hf(missing, config=cfg)
    bad = dict(state, **{"transformer.wpe.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match=r"tensor 'transformer.wpe.weight' has shape \(8, 32\), expected \(32, 32\)"):
        gpt.from_hf(bad, config=cfg)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), "n_embd=30 must be a multiple of n_head=4"),
    (dict(compute_dtype="float8"), "compute_dtype='float8': expected one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt.Config(**kwargs)


def test_input_errors(converted, tokens):
    params, cfg = converted
    with pytest.raises(ValueError, match=r"tokens must be an integer \(B, T\) array, got shape \(2, 16\) dtype float32"):
        gpt.apply(params, tokens.astype(np.float32), cfg)
    with pytest.raises(ValueError, match="tokens has length 33, more than the model's block_size=32"):
        gpt.apply(params, np.zeros((1, 33), np.int32), cfg)
    with pytest.raises(ValueError, match=r"attention_mask must have the tokens' shape \(2, 16\), got \(2, 15\)"):
        gpt.apply(params, tokens, cfg, attention_mask=np.ones((2, 15)))
    with pytest.raises(ValueError, match="max_len=33 exceeds the model's block_size=32"):
        gpt.init_cache(cfg, 1, 33)


@pytest.mark.parametrize("change, message", [
    (dict(activation_function="relu"), "activation_function='relu' is not supported"),
    (dict(n_inner=64), r"n_inner=64 is not supported \(only 4 \* n_embd\)"),
    (dict(scale_attn_by_inverse_layer_idx=True), "only the standard 1/sqrt"),
])
def test_unsupported_hugging_face_configs(change, message):
    with pytest.raises(ValueError, match=message):
        gpt.config_from_hf(transformers.GPT2Config(**dict(HF_CFG, **change)))
