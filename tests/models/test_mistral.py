"""Mistral (``llama`` with a sliding window) against Hugging Face ``MistralForCausalLM``."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from transformax import generate, models
from transformax.models import llama

WINDOW = 5
HF_CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
              sliding_window=WINDOW, bos_token_id=0, eos_token_id=None, pad_token_id=0)
apply = jax.jit(llama.apply, static_argnames=("cfg", "train"))
apply_cached = jax.jit(llama.apply_cached, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**HF_CFG)).eval()


@pytest.fixture(scope="module")
def converted(hf_model):
    module, params, cfg = models.from_hf(hf_model)
    assert module is llama and cfg.sliding_window == WINDOW
    return params, cfg


def test_logits_match_hugging_face_past_the_window(hf_model, converted, tokens, hf_run):
    params, cfg = converted
    ref = hf_run(hf_model, tokens).logits.numpy()
    np.testing.assert_allclose(apply(params, tokens, cfg), ref, atol=1e-4, rtol=1e-4)
    unwindowed = apply(params, tokens, dataclasses.replace(cfg, sliding_window=None))
    assert np.abs(unwindowed - ref).max() > 1e-2  # the window matters on these tokens


def test_greedy_generation_with_a_rolling_cache_matches_hugging_face(hf_model, converted, tokens):
    """A 12-token prompt (more than the 5-token window) and 8 new tokens; the cache holds 5
    slots."""
    params, cfg = converted
    prompt = tokens[:, :12]
    assert llama.init_cache(cfg, 2, 20).max_len == WINDOW
    out = generate.generate(llama, params, cfg, prompt, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        ref = hf_model.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=8,
                                do_sample=False, min_new_tokens=8)
    np.testing.assert_array_equal(out, ref[:, 12:].numpy())


def test_rolling_cache_with_padded_rows_matches_full_logits(converted, tokens):
    """Right-padded prefill into the rolling cache, then one step: each row's cached logits
    equal the full-sequence logits (the padding never evicts a real key)."""
    params, cfg = converted
    lengths = np.array([9, 6], np.int32)
    cache = llama.init_cache(cfg, 2, 16)
    logits, cache = apply_cached(params, tokens[:, :10], cfg, cache, lengths=lengths)
    nxt = np.array([[5], [7]], np.int32)
    step, _ = apply_cached(params, nxt, cfg, cache)
    full = tokens.copy()  # each row's prompt then its next token (what follows is not seen)
    full[np.arange(2), lengths] = nxt[:, 0]
    full = apply(params, full, cfg)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :n], full[row, :n], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(step[row, 0], full[row, n], atol=1e-5, rtol=1e-5)


def test_softcapped_decoding_matches_the_full_sequence(converted, tokens):
    """Soft-capping (through flex_attention) in the full sequence and, token by token, through
    the rolling cache; a small cap changes the logits."""
    params, cfg = converted
    capped = dataclasses.replace(cfg, attn_logit_softcapping=0.01)
    full = np.asarray(apply(params, tokens, capped))
    assert np.abs(full - np.asarray(apply(params, tokens, cfg))).max() > 1e-3
    max_len = 10
    cache = llama.init_cache(capped, 2, max_len)
    assert cache.max_len == WINDOW
    steps, cache = apply_cached(params, tokens[:, :2], capped, cache)
    steps = [steps]
    for i in range(2, max_len):
        step, cache = apply_cached(params, tokens[:, i:i + 1], capped, cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, 1), full[:, :max_len], atol=1e-5,
                               rtol=1e-5)


def test_written_as_mistral(converted):
    config = llama.config_to_hf(converted[1])
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert transformers.MistralConfig(**config).sliding_window == WINDOW


def test_saved_folder_loads_in_hugging_face_as_mistral(hf_model, converted, tokens, hf_run,
                                                      tmp_path):
    """save_pretrained -> transformers.AutoModelForCausalLM (offline): a MistralForCausalLM with
    the window, whose logits past the window equal the original's; load_pretrained reads the
    folder back with its window."""
    params, cfg = converted
    folder = models.save_pretrained(llama, params, cfg, tmp_path / "mistral")
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(back) is transformers.MistralForCausalLM
    assert back.config.sliding_window == WINDOW
    np.testing.assert_allclose(hf_run(back, tokens).logits.numpy(),
                               hf_run(hf_model, tokens).logits.numpy(), atol=1e-5, rtol=1e-5)
    module, _, again = models.load_pretrained(folder)
    assert module is llama and again == cfg


def test_write_and_cache_errors(converted, tokens):
    params, cfg = converted
    with pytest.raises(ValueError, match="to_hf: attn_logit_softcapping has no Hugging Face"):
        llama.config_to_hf(dataclasses.replace(cfg, attn_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="written as Mistral, which has no attention_bias"):
        llama.config_to_hf(dataclasses.replace(cfg, attention_bias=True))
    full = llama.init_cache(cfg, 2, 32)._replace(pos=np.array([30, 2], np.int32))
    with pytest.raises(ValueError, match="3 tokens do not fit the cache: a row already holds 30 "
                                         "of its max_seq_len=32 positions"):
        llama.apply_cached(params, tokens[:, :3], cfg, full)  # rolling: the model's positions


@pytest.mark.parametrize("kwargs, message", [
    (dict(sliding_window=0), "sliding_window must be >= 1 \\(or None\\), got 0"),
    (dict(attn_logit_softcapping=0.0), "attn_logit_softcapping must be > 0 \\(or None\\), got 0.0"),
    (dict(attn_logit_softcapping=30.0, dropout=0.1),
     "attn_logit_softcapping=30.0 needs dropout=0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.Config(dim=64, n_head=4, n_kv_head=4, **kwargs)
