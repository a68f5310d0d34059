"""``transformax-generate --quantize``."""

import numpy as np
import pytest
import torch
import transformers

from transformax import cli, generate, quant
from transformax.models import gpt


def test_generate_command_quantized(tmp_path, capsys):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=95,
        eos_token_id=95))
    model.save_pretrained(tmp_path)
    _, params, cfg = gpt.from_hf(model)
    ids = list(range(1, 9))
    assert cli.generate_main([str(tmp_path), "--ids", *map(str, ids), "--max-new-tokens", "6",
                              "--temperature", "0", "--quantize", "int8-dynamic"]) == 0
    expected = generate.generate(gpt, quant.quantize(params, "int8-dynamic"), cfg,
                                 np.array([ids]), max_new_tokens=6, temperature=0, eos_id=95,
                                 pad_id=-1)
    assert capsys.readouterr().out.split() == [str(i) for i in np.asarray(expected)[0] if i >= 0]
    with pytest.raises(SystemExit) as exit_:
        cli.generate_main([str(tmp_path), "--ids", "1", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "transformax-generate: error: argument --quantize: invalid choice: 'int4'" in err
