"""Tokenizers and initial weights of runs: a BPE run end to end (with a profiled step and
TensorBoard events), fine-tuning from a Hugging Face folder and from a run,
``transformax-prepare`` and ``transformax-export``."""

import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from tensorboard_events import read_events
from transformax import cli, cli_tools, tokenizer, train
from transformax.models import gpt, llama
from transformax.train import config as config_lib
from transformax.train import data as data_lib
from transformax.train import sources
from transformax.train.metrics import MetricsLog

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "gpt_tiny.yaml")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = ["log.progress=false", "train.steps=2", "train.batch_size=4", "eval.every=0",
         "eval.batches=1", "log.every=1"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 60 kB of ASCII Python source."""
    path = tmp_path_factory.mktemp("text") / "code.py"
    path.write_text("".join((STDLIB / n).read_text() for n in ("textwrap.py", "glob.py",
                                                              "fnmatch.py", "string.py")))
    return path


def test_bpe_run_end_to_end(tmp_path, text_file, capsys):
    cfg = train.load(TINY, [f"out_dir={tmp_path}", "name=bpe", *SMALL, "data.source=text",
                            f"data.path={text_file}", "data.tokenizer=bpe",
                            "data.vocab_size=300", "model.vocab_size=300", "data.seq_len=32",
                            "sample.max_new_tokens=6", "log.profile='1:2'",
                            "log.tensorboard=true"])
    train.train(cfg)
    run = tmp_path / "bpe"
    assert len(list((run / "profile").glob("plugins/profile/*/*.xplane.pb"))) == 1
    tok = tokenizer.load(run)
    assert tok.vocab_size == 300
    samples = (run / "samples.txt").read_text()
    assert samples.startswith("=== step 2 ===\ndef ") and len(samples) > 20
    records = MetricsLog(run / "metrics.jsonl").read()
    start = records[0]
    assert start["tokenizer"] == "bpe (300 tokens)" and start["params"] == gpt.num_params(
        train.load_run(run)[1].params)
    evals = [r for r in records if "eval_loss" in r]
    assert evals[-1]["eval_ppl"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert "eval_bpb" not in evals[-1]  # not byte tokens
    assert all("time" in r and r["elapsed_s"] >= 0 for r in records)
    (events,) = (run / "tensorboard").iterdir()
    losses = {e.step: v.simple_value for e in read_events(events) for v in e.summary.value
              if v.tag == "loss"}
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in records if "loss" in r}
    capsys.readouterr()
    assert cli.generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "5",
                              "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # a resumed run reads the run folder's tokenizer instead of learning another one
    assert sources.run_tokenizer("bpe", 300, run, lambda: b"x").encode("def f") == \
        tok.encode("def f")


@pytest.mark.slow
def test_bpe_run_on_the_stdlib_corpus(tmp_path, capsys):
    """The embedded corpus (30 MB): a 1024-token BPE learned and applied (~20 s), then a run."""
    cfg = train.load(TINY, [f"out_dir={tmp_path}", "name=stdlib", *SMALL, "data.tokenizer=bpe",
                            "data.vocab_size=1024", "model.vocab_size=1024"])
    train.train(cfg)
    assert tokenizer.load(tmp_path / "stdlib").vocab_size == 1024
    assert (tmp_path / "stdlib" / "samples.txt").read_text().startswith("=== step 2 ===\ndef ")
    capsys.readouterr()
    assert cli.generate_main([str(tmp_path / "stdlib"), "--prompt", "import ",
                              "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("import ")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random GPT-2 on bytes, saved by transformers (and the model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def finetuned(hf_folder, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = train.load(None, [f"out_dir={out}", "name=ft", *SMALL, "data.source=text",
                            f"data.path={text_file}", "data.seq_len=32", "sample.num=0",
                            f"model.init_from=hf:{hf_folder[0]}", "model.dropout=0.0"])
    return cfg, train.train(cfg)


def test_finetune_starts_at_the_hugging_face_loss(hf_folder, finetuned):
    torch = pytest.importorskip("torch")
    cfg, result = finetuned
    assert cfg.model.arch == "gpt" and cfg.model_config.n_embd == 32  # from config.json
    first = next(r for r in result.records if "loss" in r and r["step"] == 1)
    corpus = data_lib.load_corpus(cfg.data)
    batch = data_lib.Batches(corpus, cfg.seed, (1, 4), 32)(0)
    with torch.no_grad():
        logits = hf_folder[1](torch.as_tensor(batch["inputs"][0], dtype=torch.long)).logits
        ref = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 256), torch.as_tensor(batch["targets"][0].reshape(-1)).long())
    assert first["loss"] == pytest.approx(float(ref), abs=1e-5)
    last = [r for r in result.records if "eval_loss" in r][-1]  # byte tokens: bits per byte
    assert last["eval_bpb"] == pytest.approx(last["eval_loss"] / np.log(2))


def test_export_and_init_from_run(finetuned, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg, result = finetuned
    assert cli_tools.export_main([str(result.run_dir), str(tmp_path / "out")]) == 0
    assert "gpt step 2, tokenizer.json (bytes)" in capsys.readouterr().out
    assert tokenizer.load(tmp_path / "out").encode("é ") == list("é ".encode())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.arange(40, dtype=np.int32).reshape(2, 20)
    with torch.no_grad():
        ref = back(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = jax.jit(gpt.apply, static_argnums=2)(result.state.params, tokens, cfg.model_config)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # a new run from that run: its model section and its weights
    again = train.load(None, [f"model.init_from=run:{result.run_dir}", "data.seq_len=32"])
    assert again.model_config == cfg.model_config
    params = sources.initial_params(again.model.init_from, gpt, again.model_config)
    np.testing.assert_array_equal(params["wte"], result.state.params["wte"])
    with pytest.raises(config_lib.ConfigError, match=r"model.init_from='hf:.*': a transformax."
                                                     r"models.gpt checkpoint cannot start a "
                                                     r"transformax.models.llama model"):
        sources.initial_params(cfg.model.init_from, llama, llama.Config())


def test_prepare(text_file, tmp_path, capsys):
    out = tmp_path / "prep"
    assert cli_tools.prepare_main([str(text_file), "--out", str(out), "--vocab-size", "300"]) == 0
    printed = capsys.readouterr().out
    keys = printed.split("train with: ")[1].split()
    assert keys[:4] == [f"data.source=bin", f"data.path={out}", "data.dtype=uint16",
                        "data.vocab_size=300"]
    tok = tokenizer.load(out)
    text = text_file.read_text()
    n_val = int(len(text) * 0.05)
    assert tok.decode(np.fromfile(out / "train.bin", np.uint16)) == text[:-n_val]
    assert tok.decode(np.fromfile(out / "val.bin", np.uint16)) == text[-n_val:]
    cfg = train.load(TINY, [*keys, "model.vocab_size=300"])
    assert cfg.data.tokenizer == f"hf:{out / 'tokenizer.json'}"


@pytest.mark.parametrize("overrides, message", [
    (["data.tokenizer=sentencepiece"], "data.tokenizer='sentencepiece': expected bytes, bpe or "
                                       "hf:PATH"),
    (["data.tokenizer=bpe", "data.source=bin", "data.path=x", "data.vocab_size=300",
      "model.vocab_size=300"], "bpe is learned from text: data.source must be stdlib or text"),
    (["data.tokenizer=bpe", "data.vocab_size=200"], r"data.vocab_size=200: data.tokenizer=bpe "
                                                    r"needs >= 257"),
    (["data.vocab_size=300", "model.vocab_size=300"], "data.tokenizer=bytes has 256 symbols"),
    (["model.init_from=foo:/x"], r"model.init_from='foo:/x': expected hf:PATH \| run:PATH"),
    (["model.init_from=hf:/nonexistent"], "model.init_from='hf:/nonexistent': /nonexistent: no "
                                          "config.json there"),
    (["model.init_from=run:/nonexistent"], "no config.yaml in /nonexistent"),
    (["log.profile=2:1"], r"log.profile='121': expected START:STOP, .* YAML reads 10:20 as 620"),
    (["log.profile='3:3'"], r"log.profile='3:3': expected START:STOP, two step numbers with 0 "
                            r"<= START < STOP"),
])
def test_config_errors(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        train.load(TINY, overrides)


def test_tokenizer_errors(text_file, tmp_path, capsys):
    tokenizer.train_bpe(["def f(x): return x\n"] * 10, 300).save(tmp_path)
    data = config_lib.DataConfig(source="text", path=str(text_file),
                                 tokenizer=f"hf:{tmp_path}", vocab_size=256)
    with pytest.raises(config_lib.ConfigError, match=r"data.vocab_size=256: the tokenizer hf:.* "
                                                     r"has 2\d\d tokens; set data.vocab_size="):
        sources.tokenize(data, data_lib.load_corpus(data), tmp_path / "run")
    data = config_lib.DataConfig(tokenizer="hf:/nonexistent")
    with pytest.raises(config_lib.ConfigError, match="data.tokenizer='hf:/nonexistent': "
                                                     "/nonexistent: no such tokenizer"):
        sources.run_tokenizer(data.tokenizer, 256, tmp_path / "run", lambda: b"")
    assert cli_tools.export_main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"transformax-export: error: {tmp_path}: no config.yaml "
                                       f"there (not a transformax-train run folder)\n")
    assert cli_tools.prepare_main([str(tmp_path / "missing"), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("transformax-prepare: error: ") and "missing" in err
    assert err.count("\n") == 1
