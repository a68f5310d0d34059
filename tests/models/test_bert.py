import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from transformax.models import bert

HF_CFG = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0)
apply = jax.jit(bert.apply, static_argnames=("cfg", "train"))
mlm_logits = jax.jit(bert.mlm_logits, static_argnums=2)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(**HF_CFG)).eval()


@pytest.fixture(scope="module")
def converted(hf_model):
    return bert.from_hf(hf_model)[1:]


@pytest.fixture(scope="module")
def token_types():
    return np.repeat(np.arange(16)[None] >= 8, 2, 0).astype(np.int32)


def test_hidden_and_mlm_logits_match_hugging_face(hf_model, converted, tokens, padding,
                                                  token_types, hf_run):
    params, cfg = converted
    ref = hf_run(hf_model, tokens, attention_mask=padding, token_type_ids=token_types,
                 output_hidden_states=True)
    hidden = apply(params, tokens, cfg, attention_mask=padding, token_type_ids=token_types)
    np.testing.assert_allclose(hidden, ref.hidden_states[-1].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(mlm_logits(params, hidden, cfg), ref.logits.numpy(),
                               atol=1e-4, rtol=1e-4)


def test_bert_model_without_head(hf_model, converted, tokens, hf_run):
    base = hf_model.bert
    _, params, cfg = bert.from_hf(base)
    assert "mlm" not in params
    ref = hf_run(base, tokens).last_hidden_state.numpy()
    np.testing.assert_allclose(apply(params, tokens, cfg), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="params have no 'mlm' head"):
        bert.mlm_logits(params, ref, cfg)


def test_num_params_matches_hugging_face(hf_model, converted):
    assert bert.num_params(converted[0]) == sum(p.numel() for p in hf_model.parameters())


def test_jit_parity(converted, tokens, padding, token_types, eager):
    params, cfg = converted
    kwargs = dict(attention_mask=padding, token_type_ids=token_types)
    hidden = apply(params, tokens, cfg, **kwargs)
    np.testing.assert_allclose(hidden, eager(bert.apply, params, tokens, cfg, **kwargs),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mlm_logits(params, hidden, cfg),
                               eager(bert.mlm_logits, params, hidden, cfg), atol=1e-5, rtol=1e-5)


def test_init_shapes(converted):
    cfg = converted[1]
    params = jax.eval_shape(lambda key: bert.init(key, cfg), jax.random.key(0))
    assert params["mlm"]["bias"].shape == (96,)
    assert params["blocks"][0]["attn"]["qkv"]["w"].shape == (32, 96)
    assert bert.num_params(params) == bert.num_params(converted[0])


def test_bf16_compute_close_to_f32(converted, tokens, padding):
    """Documented tolerance: bf16 compute hidden states within 2% of the f32 ones' largest magnitude."""
    params, cfg = converted
    ref = apply(params, tokens, cfg, attention_mask=padding)
    out = apply(params, tokens, dataclasses.replace(cfg, compute_dtype="bfloat16"),
                attention_mask=padding)
    assert float(jnp.abs(out - ref).max()) <= 0.02 * float(jnp.abs(ref).max())


def test_dropout(converted, tokens):
    params, cfg = converted
    assert cfg.dropout == 0.1  # from the Hugging Face config
    with pytest.raises(ValueError, match="train=True with dropout=0.1 needs rng="):
        bert.apply(params, tokens, cfg, train=True)
    rng = jax.random.key(0)
    a = apply(params, tokens, cfg, train=True, rng=rng)
    np.testing.assert_array_equal(a, apply(params, tokens, cfg, train=True, rng=rng))
    assert not np.allclose(a, apply(params, tokens, cfg))


def test_errors(hf_model, converted, tokens):
    params, cfg = converted
    with pytest.raises(ValueError, match=r"token_type_ids must have the tokens' shape \(2, 16\), got \(2, 8\)"):
        bert.apply(params, tokens, cfg, token_type_ids=np.zeros((2, 8), np.int32))
    with pytest.raises(ValueError, match="tokens has length 33, more than the model's max_position=32"):
        bert.apply(params, np.zeros((1, 33), np.int32), cfg)
    state = {k: v for k, v in hf_model.state_dict().items()
             if k != "bert.encoder.layer.1.attention.self.value.bias"}
    with pytest.raises(ValueError, match=r"missing tensors \[bert.encoder.layer.1.attention.self.value.bias\]"):
        bert.from_hf(state, config=hf_model.config)
    with pytest.raises(ValueError, match="dim=30 must be a multiple of n_head=4"):
        bert.Config(dim=30, n_head=4)


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="relu"), "hidden_act='relu' is not supported"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
])
def test_unsupported_hugging_face_configs(change, message):
    with pytest.raises(ValueError, match=message):
        bert.config_from_hf(transformers.BertConfig(**dict(HF_CFG, **change)))
