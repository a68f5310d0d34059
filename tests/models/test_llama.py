import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from transformax import nn
from transformax.models import llama

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
HF_CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
              rope_parameters=LLAMA3_ROPE, bos_token_id=0, eos_token_id=0, pad_token_id=0)
apply = jax.jit(llama.apply, static_argnames=("cfg", "train"))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CFG)).eval()


@pytest.fixture(scope="module")
def converted(hf_model):
    return llama.from_hf(hf_model)[1:]


def test_config_from_hf(converted):
    cfg = converted[1]
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.tie_embeddings) == (4, 2, 8, False)
    assert cfg.rope_scaling == nn.RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position=8)


def test_logits_match_hugging_face_gqa(hf_model, converted, tokens, padding, hf_run):
    params, cfg = converted
    ref = hf_run(hf_model, tokens).logits.numpy()
    np.testing.assert_allclose(apply(params, tokens, cfg), ref, atol=1e-4, rtol=1e-4)
    ref = hf_run(hf_model, tokens, attention_mask=padding).logits.numpy()
    out = np.asarray(apply(params, tokens, cfg, attention_mask=padding))
    real = padding.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=1e-4)


def test_tied_with_bias_matches_hugging_face(tokens, hf_run):
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(**dict(HF_CFG, num_hidden_layers=1, tie_word_embeddings=True,
                                             attention_bias=True, mlp_bias=True,
                                             rope_parameters=None))
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    _, params, cfg = llama.from_hf(model)
    assert cfg.tie_embeddings and "lm_head" not in params and cfg.rope_scaling is None
    assert llama.num_params(params) == sum(p.numel() for p in model.parameters())
    np.testing.assert_allclose(apply(params, tokens, cfg), hf_run(model, tokens).logits.numpy(),
                               atol=1e-4, rtol=1e-4)


def test_num_params_matches_hugging_face(hf_model, converted):
    assert llama.num_params(converted[0]) == sum(p.numel() for p in hf_model.parameters())


def test_jit_parity(converted, tokens, eager):
    params, cfg = converted
    np.testing.assert_allclose(apply(params, tokens, cfg), eager(llama.apply, params, tokens, cfg),
                               atol=1e-5, rtol=1e-5)


def test_init_shapes(converted):
    cfg = converted[1]
    params = jax.eval_shape(lambda key: llama.init(key, cfg), jax.random.key(0))
    assert params["blocks"][0]["attn"]["qkv"]["w"].shape == (32, (4 + 2 * 2) * 8)
    assert params["blocks"][0]["mlp"]["gate_up"]["w"].shape == (32, 2 * 64)
    assert params["lm_head"]["w"].shape == (32, 96)
    assert llama.num_params(params) == llama.num_params(converted[0])


def test_bf16_compute_close_to_f32(converted, tokens):
    """Documented tolerance: bf16 compute logits within 2% of the f32 logits' largest magnitude."""
    params, cfg = converted
    ref = apply(params, tokens, cfg)
    out = apply(params, tokens, dataclasses.replace(cfg, compute_dtype="bfloat16"))
    assert float(jnp.abs(out - ref).max()) <= 0.02 * float(jnp.abs(ref).max())


def test_from_hf_errors(hf_model, converted):
    cfg = converted[1]
    state = hf_model.state_dict()
    bad = dict(state, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                         r"\(32, 32\), expected \(16, 32\)"):
        llama.from_hf(bad, config=cfg)
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \[lm_head.weight\]"):
        llama.from_hf(missing, config=hf_model.config)
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        llama.config_from_hf(transformers.LlamaConfig(**dict(
            HF_CFG, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_head=4, n_kv_head=3, dim=64), "n_head=4 must be a multiple of n_kv_head=3"),
    (dict(n_head=5, n_kv_head=5, dim=64), r"dim=64 must be a multiple of n_head=5 \(or set head_dim\)"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.Config(**kwargs)


def test_input_errors(converted):
    params, cfg = converted
    with pytest.raises(ValueError, match="tokens has length 33, more than the model's max_seq_len=32"):
        llama.apply(params, np.zeros((1, 33), np.int32), cfg)
    with pytest.raises(ValueError, match="max_len=40 exceeds the model's max_seq_len=32"):
        llama.init_cache(cfg, 1, 40)


def test_unsupported_activation():
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        llama.config_from_hf(transformers.LlamaConfig(**dict(HF_CFG, hidden_act="gelu")))
