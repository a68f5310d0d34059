"""Whole runs on gpt_tiny: the run folder, resume, divergence, checkpoints, the command line."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from transformax import cli, train
from transformax.train import data as data_lib
from transformax.train.checkpoint import Checkpoints
from transformax.train.metrics import MetricsLog

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "gpt_tiny.yaml")
QUIET = ["log.progress=false", "sample.num=0"]
ONE_LAYER = ["model.n_layer=1", "model.n_embd=32"]  # compiles in half the time


def load(tmp_path, *overrides):
    return train.load(TINY, [f"out_dir={tmp_path}", *QUIET, *overrides])


def assert_states_equal(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_run_folder(tmp_path):
    cfg = load(tmp_path, *ONE_LAYER, "name=full", "train.steps=40", "eval.every=20",
               "checkpoint.every=20",
               "log.every=10", "checkpoint.keep=1", "sample.num=1")
    result = train.train(cfg)
    run = tmp_path / "full"
    assert result.run_dir == run and int(result.state.step) == 40
    assert train.load(str(run / "config.yaml")) == cfg
    records = MetricsLog(run / "metrics.jsonl").read()
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(steps[0])
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < np.log(256) - 1.0
    assert records[0]["event"] == "started" and records[0]["compile_s"] > 0
    assert (run / "loss.png").stat().st_size > 10_000
    assert Checkpoints(run / "checkpoints", 1).all_steps() == [40]  # keep=1
    samples = (run / "samples.txt").read_text()
    assert samples.startswith("=== step 40 ===\ndef ") and len(samples) > 40


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 steps in one go (dropout and gradient accumulation on; seed 1, whose raw key is
    nonzero, so a restore that loses the RNG key changes the dropout masks)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load(out, *ONE_LAYER, "name=straight", "seed=1", "train.steps=20",
               "model.dropout=0.1", "train.grad_accum=2", "checkpoint.every=5", "eval.every=0")
    return out, train.train(cfg)


def test_resume_continues_exactly(tmp_path, straight):
    overrides = [*ONE_LAYER, "name=split", "seed=1", "train.steps=20", "model.dropout=0.1",
                 "train.grad_accum=2", "checkpoint.every=5", "eval.every=0"]
    first = train.train(load(tmp_path, *overrides), stop_at=10)
    assert int(first.state.step) == 10
    second = train.train(load(tmp_path, *overrides))  # resumes automatically
    assert second.records[0]["event"] == "resumed" and second.records[0]["step"] == 10
    _, full = straight
    assert_states_equal(second.state, full.state, atol=1e-6)
    loss = [r["loss"] for r in full.records if r.get("step") == 20 and "loss" in r]
    assert [r["loss"] for r in second.records if r.get("step") == 20 and "loss" in r] == loss
    logged = MetricsLog(tmp_path / "split" / "metrics.jsonl").read()
    assert [r["step"] for r in logged if "loss" in r] == [10, 20]


@pytest.mark.slow  # SIGTERM/SIGINT mid-run are in the default run (test_faults.py)
def test_sigkill_then_resume_loses_nothing_beyond_the_last_checkpoint(tmp_path, straight):
    """A run killed mid-training (maybe mid-save) resumes from its last complete checkpoint and
    ends exactly where an uninterrupted run does."""
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY,
            f"out_dir={tmp_path}", *ONE_LAYER, "name=killed", "seed=1", "train.steps=20",
            "model.dropout=0.1",
            "train.grad_accum=2", "checkpoint.every=1", "eval.every=0", "log.every=1", *QUIET]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 8,' in metrics.read_text():
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = Checkpoints(tmp_path / "killed" / "checkpoints", 3).latest_step()
    assert saved is not None and 5 <= saved < 20
    with pytest.warns(RuntimeWarning, match=r"taking over the lock of pid \d+ on .*, which is "
                                            r"no longer running"):
        resumed = train.train(train.load(str(tmp_path / "killed" / "config.yaml")), resume=True)
    assert resumed.records[0]["step"] == saved
    assert_states_equal(resumed.state, straight[1].state, atol=1e-6)


def test_interrupted_save_is_never_picked_up(tmp_path, straight):
    out, _ = straight
    run = tmp_path / "straight"
    shutil.copytree(out / "straight", run)
    ckpts = run / "checkpoints"
    # What a save cut short leaves behind: orbax's temporary folder, half written.
    partial = ckpts / "25.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(ckpts / "20", partial)
    shutil.rmtree(partial / "state")
    (partial / "commit_success.txt").unlink(missing_ok=True)
    assert Checkpoints(ckpts, 3).latest_step() == 20
    cfg, state = train.load_run(run)
    assert int(state.step) == 20 and cfg.name == "straight"


def test_resume_guards(tmp_path, straight):
    out, _ = straight
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train(load(tmp_path, "name=fresh"), resume=True)
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        train.train(load(out, *ONE_LAYER, "name=straight", "train.steps=20"), resume=False)
    with pytest.raises(train.ConfigError, match="model.n_embd"):
        train.train(load(out, "model.n_layer=1", "name=straight", "train.steps=30"))


def test_nan_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = data_lib.Batches.__call__

    def poisoned(self, step, stream=data_lib.TRAIN):
        batch = original(self, step, stream)
        if step >= 7:  # an out-of-range token: its embedding row reads NaN
            batch["inputs"][..., 0] = 10_000
        return batch

    monkeypatch.setattr(data_lib.Batches, "__call__", poisoned)
    with pytest.raises(train.TrainingDiverged, match=r"loss=nan.* at step 8; the last good "
                                                     r"checkpoint is step 5"):
        # the shipped train.steps: test_gpt_tiny_learns's compiled step
        train.train(load(tmp_path, "name=nan", "checkpoint.every=5"))
    assert Checkpoints(tmp_path / "nan" / "checkpoints", 3).all_steps() == [5]
    records = (tmp_path / "nan" / "metrics.jsonl").read_text()
    assert '"event": "diverged"' in records and (tmp_path / "nan" / "loss.png").exists()


def test_cli(tmp_path, capsys):
    assert cli.train_main(["--config", TINY, "--print-config", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert cli.train_main(["--config", TINY, "train.stepz=3"]) == 1
    assert "train.stepz" in capsys.readouterr().err
    # test_run_folder's model and train.steps: its compiled step
    assert cli.train_main(["--config", TINY, f"out_dir={tmp_path}", "name=cli", *ONE_LAYER,
                           "train.steps=40", "eval.batches=1", *QUIET]) == 0
    assert "done:" in capsys.readouterr().out
    assert cli.generate_main([str(tmp_path / "cli"), "--prompt", "import ",
                              "--max-new-tokens", "8", "--num", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("import ")


def test_tune_malloc_reexecutes_once(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nfrom transformax.cli import tune_malloc\n"
                      "print(os.getpid(), flush=True)\ntune_malloc()\n"
                      "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "TRANSFORMAX_NO_REEXEC")}
    out = subprocess.run([sys.executable, str(script), "a=1"], capture_output=True, text=True,
                         env=env, check=True).stdout.split("\n")
    assert out[0] == out[1]  # the same process, re-executed once
    assert out[2] == f"{cli.MALLOC_TUNABLES} ['a=1']"


@pytest.mark.parametrize("name, extra", [
    ("llama_small", ["model.n_layer=1", "model.dim=32", "model.hidden_dim=64",
                     "model.max_seq_len=32", "sample.max_new_tokens=8", "sample.num=1"]),
    ("bert_mlm_small", ["model.n_layer=1", "model.dim=32", "model.hidden_dim=64",
                        "model.max_position=32"]),
])
def test_other_architectures_train(tmp_path, name, extra):
    cfg = train.load(str(ROOT / "configs" / f"{name}.yaml"), [
        f"out_dir={tmp_path}", "log.progress=false", "sample.num=0", "data.seq_len=32",
        "train.steps=6", "train.batch_size=4", "optim.warmup_steps=1", "eval.batches=1",
        "log.every=1", *extra])
    result = train.train(cfg)
    losses = [r["loss"] for r in result.records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any("eval_loss" in r for r in result.records)
    assert (tmp_path / name / "samples.txt").exists() == (name == "llama_small")


def test_gpt_tiny_learns(tmp_path):
    result = train.train(load(tmp_path))
    evals = [r["eval_loss"] for r in result.records if "eval_loss" in r]
    assert evals[-1] < 2.6
