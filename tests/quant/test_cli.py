"""``transformax-generate --quantize`` and ``scripts/eval_quant.py``, with ``int8-static``
calibrated on the folder's own data (``quant.folder_calibration``)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from transformax import cli, generate, models, quant, tokenizer, train
from transformax.models import gpt
from transformax.train import data as data_lib

ROOT = Path(__file__).parents[2]
# One compiled shape: a 1-layer GPT on bytes, 32-byte sequences, 2 training steps.
RUN = ["name=run", "model.n_layer=1", "model.n_embd=32", "model.block_size=32",
       "data.seq_len=32", "train.steps=2", "train.batch_size=4", "eval.every=0",
       "eval.batches=1", "log.progress=false", "sample.num=0", "optim.warmup_steps=1"]


def eval_quant_main(argv):
    spec = importlib.util.spec_from_file_location("eval_quant", ROOT / "scripts/eval_quant.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(argv)


def in_stdlib_training_split(rows) -> bool:
    train_bytes = bytes(data_lib.load_corpus(train.config.DataConfig()).train)
    return all(bytes(row.astype(np.uint8)) in train_bytes for row in rows)


def greedy_text(params, cfg, prompt: str) -> str:
    new = generate.generate(gpt, params, cfg, np.array([list(prompt.encode())], np.int32),
                            max_new_tokens=5, temperature=0, pad_id=-1)
    return tokenizer.BYTES.decode(np.asarray(new)[0])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train.train(train.load(str(ROOT / "configs/gpt_tiny.yaml"), [f"out_dir={out}", *RUN]))
    return out / "run"


def test_generate_command_quantized(hf_gpt2_folder, capsys):
    folder, params, cfg = hf_gpt2_folder
    ids = list(range(1, 9))
    assert cli.generate_main([str(folder), "--ids", *map(str, ids), "--max-new-tokens", "6",
                              "--temperature", "0", "--quantize", "int8-dynamic"]) == 0
    expected = generate.generate(gpt, quant.quantize(params, "int8-dynamic"), cfg,
                                 np.array([ids]), max_new_tokens=6, temperature=0, eos_id=95,
                                 pad_id=-1)
    assert capsys.readouterr().out.split() == [str(i) for i in np.asarray(expected)[0] if i >= 0]
    with pytest.raises(SystemExit) as exit_:
        cli.generate_main([str(folder), "--ids", "1", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "transformax-generate: error: argument --quantize: invalid choice: 'int4'" in err
    # int8-static on a folder without a tokenizer: nothing to calibrate on, one line
    assert cli.generate_main([str(folder), "--ids", "1", "--quantize", "int8-static"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert (f"transformax-generate: error: int8-static calibrates on text, and {folder} has no "
            f"tokenizer") in err


@pytest.mark.slow  # ~5 s: a model of its own compiled; the default run checks the error path
def test_int8_static_on_a_model_folder_calibrates_on_the_default_corpus(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=4, bos_token_id=0,
        eos_token_id=0)).save_pretrained(tmp_path)
    tokenizer.BYTES.save(tmp_path)
    _, params, cfg = models.load_pretrained(tmp_path)
    fn, batches = quant.folder_calibration(tmp_path, gpt, cfg, tokenizer.BYTES)
    assert [b.shape for b in batches] == [(8, cfg.block_size)] * 4  # context 32 < 128
    assert in_stdlib_training_split([b[0] for b in batches])
    assert cli.generate_main([str(tmp_path), "--prompt", "def ", "--max-new-tokens", "5",
                              "--temperature", "0", "--quantize", "int8-static"]) == 0
    qparams = quant.quantize(params, "int8-static", calibration=(fn, batches))
    assert capsys.readouterr().out == "def " + greedy_text(qparams, cfg, "def ") + "\n"


@pytest.mark.slow
def test_int8_static_on_a_run_folder(run_folder, capsys):
    """The CLI calibrates on 4 batches of 8 windows of the run's training split and greedy
    decoding follows the statically quantized model; eval_quant.py reports its loss."""
    cfg, state = train.load_run(run_folder)
    fn, batches = quant.folder_calibration(run_folder, gpt, cfg.model_config)
    assert [b.shape for b in batches] == [(8, 32)] * 4
    assert in_stdlib_training_split(np.concatenate(batches))  # the run's data: stdlib bytes
    assert cli.generate_main([str(run_folder), "--prompt", "def ", "--max-new-tokens", "5",
                              "--temperature", "0", "--quantize", "int8-static"]) == 0
    qparams = quant.quantize(state.params, "int8-static", calibration=(fn, batches))
    assert capsys.readouterr().out == "def " + greedy_text(qparams, cfg.model_config, "def ") + "\n"
    assert eval_quant_main([str(run_folder), "--recipes", "int8-static", "--batches", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (static,) = [line.split() for line in lines if line.startswith("int8-static")]
    assert abs(float(static[3].rstrip("%"))) < 1.0  # held-out loss within 1% of f32
