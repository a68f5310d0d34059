"""The command lines as installed without torch: ``transformax-generate`` on a Hugging Face folder
with its ``tokenizer.json``, and the persistent compilation cache across two training runs."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from transformax import compile_cache, tokenizer

ROOT = Path(__file__).parents[1]
# torch and transformers made unimportable, then one command line run
NO_TORCH = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "from transformax import cli_tools, cli; sys.argv[0] = {prog!r}; "
            "sys.exit(cli.{main}())")


def run_cli(main: str, *args: str, env=None) -> subprocess.CompletedProcess:
    code = NO_TORCH.format(prog=f"transformax-{main.split('_')[0]}", main=main)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "TRANSFORMAX_NO_REEXEC": "1", **(env or {})})


def test_generate_on_a_hugging_face_folder_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    tok = tokenizer.train_bpe(text.splitlines(keepends=True), 300)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0, initializer_range=0.5)).eval()  # peaked logits: no near-ties in argmax
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    prompt = "def wrap(text"
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0].tolist()
    done = run_cli("generate_main", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8",
                   "--temperature", "0", "--no-compile-cache")
    assert done.returncode == 0, done.stderr
    assert done.stdout == tok.decode(ref) + "\n"


def test_compilation_cache_across_runs(tmp_path):
    cache = tmp_path / "cache"
    args = ["--config", str(ROOT / "configs" / "gpt_tiny.yaml"), f"out_dir={tmp_path}",
            "train.steps=1", "eval.every=0", "sample.num=0", "log.progress=false",
            "model.n_layer=1"]
    compile_s = []
    for name in ("first", "second"):
        done = run_cli("train_main", *args, f"name={name}",
                       env={compile_cache.ENV: str(cache)})
        assert done.returncode == 0, done.stderr
        start = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        compile_s.append(start["compile_s"])
    assert any(cache.iterdir())
    assert compile_s[1] < 0.5 * compile_s[0] and compile_s[1] < 3.0, compile_s


def test_compilation_cache_off(monkeypatch):
    assert compile_cache.enable(False) is None  # --no-compile-cache
    monkeypatch.setenv(compile_cache.ENV, "")
    assert compile_cache.enable() is None
