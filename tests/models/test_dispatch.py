import pytest
import torch
import transformers

from transformax import models
from transformax.models import bert, gpt, llama


@pytest.mark.parametrize("hf_cls, hf_cfg, module", [
    (transformers.GPT2LMHeadModel, transformers.GPT2Config(vocab_size=96, n_positions=16, n_embd=32,
                                                           n_layer=1, n_head=4), gpt),
    (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16), llama),
    (transformers.BertModel, transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16), bert),
])
def test_from_hf_picks_the_module(hf_cls, hf_cfg, module):
    torch.manual_seed(0)
    got, params, cfg = models.from_hf(hf_cls(hf_cfg), param_dtype="bfloat16")
    assert got is module and isinstance(cfg, module.Config)
    assert cfg.param_dtype == "bfloat16"


def test_from_hf_unsupported():
    with pytest.raises(ValueError, match="model_type='t5' is not supported"):
        models.from_hf({}, config=transformers.T5Config())
