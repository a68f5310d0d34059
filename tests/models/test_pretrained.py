"""Hugging Face folders in and out: small random models saved by ``transformers``, read by
``load_pretrained`` in a subprocess that cannot import torch or ``transformers``, written back by
``save_pretrained`` and read again by ``transformers``; outputs equal both ways."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers

from transformax import models
from transformax.models import bert, gpt, llama

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
MODELS = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "llama_gqa": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **LLAMA, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)),
}

# Runs with torch and transformers unimportable: load each folder, write its logits, save it back.
NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = sys.modules["transformers"] = None
    import jax, numpy as np
    from transformax import models
    root, names = sys.argv[1], sys.argv[2:]
    tokens = np.load(f"{root}/tokens.npy")
    for name in names:
        module, params, cfg = models.load_pretrained(f"{root}/{name}")
        out = jax.jit(module.apply, static_argnums=2)(params, tokens, cfg)
        if hasattr(module, "mlm_logits"):
            out = module.mlm_logits(params, out, cfg)
        np.save(f"{root}/{name}.npy", np.asarray(out))
        models.save_pretrained(module, params, cfg, f"{root}/{name}_out")
""")


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokens):
    """``(root, {name: (hf_model, reference logits)})`` after the torch-free subprocess ran."""
    root = tmp_path_factory.mktemp("hf")
    np.save(root / "tokens.npy", tokens)
    made = {}
    for i, (name, (cls, cfg)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        # the GPT-2 folder is sharded (model.safetensors.index.json) to read an index too
        model.save_pretrained(root / name, safe_serialization=True,
                              **({"max_shard_size": "20KB"} if name == "gpt2" else {}))
        made[name] = (model, _logits(model, tokens))
    subprocess.run([sys.executable, "-c", NO_TORCH, str(root), *MODELS], check=True)
    return root, made


@pytest.mark.parametrize("name", list(MODELS))
def test_load_without_torch_matches_hugging_face(folders, name):
    root, made = folders
    np.testing.assert_allclose(np.load(root / f"{name}.npy"), made[name][1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_folder_loads_in_hugging_face(folders, name, tokens):
    root, made = folders
    auto = (transformers.AutoModelForMaskedLM if name == "bert"
            else transformers.AutoModelForCausalLM)
    back = auto.from_pretrained(root / f"{name}_out").eval()
    np.testing.assert_allclose(_logits(back, tokens), made[name][1], atol=1e-4, rtol=0)
    if name == "bert":  # AutoModel reads the same folder as a BertModel
        base = transformers.AutoModel.from_pretrained(root / f"{name}_out").eval()
        with torch.no_grad():
            hidden = base(torch.as_tensor(tokens, dtype=torch.long)).last_hidden_state
            ref = made[name][0].bert(torch.as_tensor(tokens, dtype=torch.long)).last_hidden_state
        np.testing.assert_allclose(hidden.numpy(), ref.numpy(), atol=1e-4, rtol=0)


def test_sharded_and_dtype(folders):
    root, _ = folders
    assert (root / "gpt2" / "model.safetensors.index.json").exists()
    module, params, cfg = models.load_pretrained(root / "llama_tied", dtype="bfloat16")
    assert module is llama and cfg.tie_embeddings and "lm_head" not in params
    assert params["embed"].dtype == "bfloat16" and cfg.param_dtype == "bfloat16"
    out = models.save_pretrained(module, params, cfg, root / "llama_bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = models.load_pretrained(out)[1]
    np.testing.assert_array_equal(np.asarray(again["embed"]),
                                  np.asarray(params["embed"], np.float32))


def test_from_hf_accepts_a_config_dict(folders):
    root, made = folders
    config = json.loads((root / "llama_gqa" / "config.json").read_text())
    state = made["llama_gqa"][0].state_dict()
    module, params, cfg = models.from_hf(state, config=config)
    _, params2, cfg2 = llama.from_hf(made["llama_gqa"][0])
    assert module is llama and cfg == cfg2
    np.testing.assert_array_equal(params["lm_head"]["w"], params2["lm_head"]["w"])
    # keys left out of config.json take the transformers defaults
    assert gpt.config_from_hf({"n_layer": 2}) == gpt.Config(n_layer=2, dropout=0.1)
    with pytest.raises(ValueError, match="from_hf: a model_type='llama' config, expected 'gpt2'"):
        gpt.from_hf(made["llama_gqa"][0])


def test_mismatched_state_dicts_are_refused(folders):
    _, made = folders
    gpt_state = made["gpt2"][0].state_dict()
    gpt_cfg = made["gpt2"][0].config
    one_layer = transformers.GPT2Config(**dict(gpt_cfg.to_dict(), n_layer=1))
    with pytest.raises(ValueError, match=r"tensors the config does not use \[transformer\.h\.1\."
                                         r"attn\.c_attn\.bias, .* \(12 in all\)\]"):
        gpt.from_hf(gpt_state, config=one_layer)
    three = transformers.GPT2Config(**dict(gpt_cfg.to_dict(), n_layer=3))
    with pytest.raises(ValueError, match=r"missing tensors \[transformer\.h\.2\.ln_1\.weight"):
        gpt.from_hf(gpt_state, config=three)
    untied = dict(gpt_state, **{"lm_head.weight": torch.zeros(96, 32)})
    with pytest.raises(ValueError, match="tensor 'lm_head.weight' differs from 'wte.weight', but "
                                         "the config ties them"):
        gpt.from_hf(untied, config=gpt_cfg)
    llama_state = made["llama_gqa"][0].state_dict()
    tied = dict(made["llama_gqa"][0].config.to_dict(), tie_word_embeddings=True)
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'embed_tokens.weight'"):
        llama.from_hf(llama_state, config=tied)
    untied_cfg = dict(made["llama_tied"][0].config.to_dict(), tie_word_embeddings=False)
    state = {k: v for k, v in made["llama_tied"][0].state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \[lm_head.weight\]"):
        llama.from_hf(state, config=untied_cfg)
    no_bias = dict(made["llama_tied"][0].config.to_dict(), attention_bias=False)
    with pytest.raises(ValueError, match=r"does not use \[model.layers.0.self_attn.k_proj.bias"):
        llama.from_hf(made["llama_tied"][0].state_dict(), config=no_bias)
    bert_state = dict(made["bert"][0].state_dict(), **{"classifier.weight": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match=r"does not use \[classifier.weight\]"):
        bert.from_hf(bert_state, config=made["bert"][0].config)


def test_eos_id(folders):
    root, _ = folders
    assert models.pretrained.eos_id(root / "llama_gqa", 96) == 2  # LlamaConfig's default
    with pytest.warns(UserWarning, match=r"eos_token_id=50256 is outside the vocabulary \(0 to "
                                         r"95\); generation will not stop early"):
        assert models.pretrained.eos_id(root / "gpt2", 96) is None


def test_folder_errors(folders, tmp_path):
    root, _ = folders
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"model_type='t5' is not supported; expected one of "
                                         r"\['bert', 'gpt2', 'llama', 'mistral'\]"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or "
                                                r"model.safetensors.index.json there"):
        models.load_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "model-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names model-00001.safetensors, which is missing"):
        models.load_pretrained(tmp_path)
    module, params, cfg = models.load_pretrained(root / "gpt2")
    with pytest.raises(TypeError, match="cfg is a transformax.models.gpt.Config, expected "
                                        "transformax.models.llama.Config"):
        models.save_pretrained(llama, params, cfg, tmp_path / "x")
