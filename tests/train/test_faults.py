"""Faults and bad input against the command lines: each refused with one ``error:`` line and a
non-zero exit, no traceback, no completed step lost, and a refused run leaves the folder as it
was."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformax import cli, train
from transformax.train.checkpoint import Checkpoints
from transformax.train.runlock import LOCK_FILE, run_lock

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "gpt_tiny.yaml")
# One compiled shape for every run here: a 1-layer model, 4 sequences of 32 bytes.
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.block_size=32", "data.seq_len=32",
         "train.batch_size=4", "eval.every=0", "eval.batches=1", "log.every=1",
         "log.progress=false", "sample.num=0", "optim.warmup_steps=1"]


def args(out, name, *extra):
    return ["--config", TINY, f"out_dir={out}", f"name={name}", *SMALL, *extra]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_error_line(err: str, prog: str = "transformax-train") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 6 steps stopped after step 4, with checkpoints at 2 and 4; tests copy it before
    changing it. The runs resuming it keep train.steps=6: one compiled step for all of them."""
    out = tmp_path_factory.mktemp("runs")
    cfg = train.load(TINY, [f"out_dir={out}", "name=base", *SMALL, "train.steps=6",
                            "checkpoint.every=2"])
    assert int(train.train(cfg, stop_at=4).state.step) == 4
    return out / "base"


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


@pytest.mark.parametrize("extra, message", [
    (["model.n_embd=64"], "model.n_embd: differ from the checkpoint"),
    (["train.steps=3"], "train.steps=3: the checkpoint to resume .* is at step 4"),
    (["data.seq_len=16"], "data.seq_len: differ from the checkpoint"),
])
def test_rejected_resume_leaves_the_folder_byte_identical(finished, tmp_path, capsys, extra,
                                                          message):
    run = copy(finished, tmp_path)
    before = snapshot(run)
    assert cli.train_main(args(tmp_path, "base", "train.steps=6", *extra)) == 1
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert snapshot(run) == before


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: write(d / "c.yaml", "train: {steps: 3\n"), [],
     r"c.yaml': YAML syntax error at line 2, column 1: .*expected ',' or '}'"),
    (lambda d: write(d / "c.yaml", "# nothing\n"), [], r"c.yaml' is empty: expected a mapping"),
    (lambda d: write(d / "c.yaml", "- 1\n"), [], r"c.yaml' is a ListConfig: expected a mapping"),
    (lambda d: str(d / "nope.yaml"), [], r"nope.yaml' does not exist"),
    (lambda d: TINY, ["optim.eps=-1"], r"optim.eps=-1.0: expected > 0"),
    (lambda d: TINY, ["optim.lr=nan"], r"optim.lr=nan: expected a finite number"),
    (lambda d: TINY, ["sample.prompt=''"], r"sample.prompt='': 0 tokens; expected 1 to 63 "
                                           r"\(the model's block_size=64 less room"),
    (lambda d: TINY, ["sample.prompt=" + "x" * 64], r"sample.prompt='x+': 64 tokens; expected"),
    (lambda d: TINY, ["sample.max_new_tokens=0"], r"sample.max_new_tokens=0: expected >= 1 "
                                                  r"\(or sample.num=0"),
    (lambda d: TINY, ["data.source=text", "data.path=/no/such/file"],
     r"data.path='/no/such/file': no such file or folder"),
])
def test_bad_config_or_data_is_one_line_and_touches_nothing(tmp_path, capsys, make, extra,
                                                             message):
    status = cli.train_main(["--config", make(tmp_path), f"out_dir={tmp_path}/runs", *extra])
    assert status == 1
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert cli.train_main(["--debug", "--config", TINY, "optim.eps=-1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        "transformax-train: error: optim.eps=-1.0")


def test_an_unexpected_error_is_one_line_too(tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("XLA went away\nwith many lines of detail")

    monkeypatch.setattr(train, "train", broken)
    assert cli.train_main(args(tmp_path, "x")) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "transformax-train: error: RuntimeError: XLA went away (--debug shows where)")


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    data = run / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    cfg, state = train.load_run(run)  # reading (transformax-generate) falls back too
    assert int(state.step) == 2
    capsys.readouterr()
    assert cli.train_main(args(tmp_path, "base", "train.steps=6", "checkpoint.every=2")) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert "checkpoint step 4 in" in warnings[0] and "does not restore" in warnings[0]
    assert "using step 2" in warnings[0] and "moved to" in warnings[1]
    assert "step 6" in captured.out and "Traceback" not in captured.err
    assert Checkpoints(run / "checkpoints", 3).all_steps() == [2, 4, 6]
    assert len(list((run / "damaged_checkpoints").iterdir())) == 1
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_torn_metrics_line_is_dropped_with_a_warning(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a write cut short
    assert cli.train_main(args(tmp_path, "base", "train.steps=6")) == 0
    err = capsys.readouterr().err
    assert "transformax-train: warning: " in err and "not a metrics record" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_stale_lock_is_taken_over_and_a_live_one_refused(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "h", "since": "then"}))
    assert cli.train_main(args(tmp_path, "base", "train.steps=6")) == 0
    assert ("taking over the lock of pid 999999 on h (since then), which is no longer running"
            in capsys.readouterr().err)
    assert not (run / LOCK_FILE).exists()
    before = snapshot(run)
    with run_lock(run):
        assert cli.train_main(args(tmp_path, "base", "train.steps=6")) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"run folder {run} is in use by pid {os.getpid()} on " in line
    assert snapshot(run) == before


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "config.yaml: no space left on device (disk full)"),
    (errno.EROFS, "config.yaml: read-only file system"),
])
def test_disk_full_and_read_only_folder(finished, tmp_path, capsys, monkeypatch, code, message):
    run = copy(finished, tmp_path)
    real = Path.write_text

    def failing(self, *a, **k):
        if self.name == "config.yaml":
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing)
    assert cli.train_main(args(tmp_path, "base", "train.steps=6")) == 1
    assert one_error_line(capsys.readouterr().err).endswith(message)
    assert Checkpoints(run / "checkpoints", 3).all_steps() == [2, 4]


def test_orbax_disk_full_is_named(finished, tmp_path, capsys, monkeypatch):
    copy(finished, tmp_path)

    def full(self, state, config):
        logging.getLogger("absl").error("orbax logs what it raises, with a traceback")
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" at local file "/x/ckpt/2": '
                         'Failed writing: [OSError] No space left on device')

    monkeypatch.setattr(Checkpoints, "save", full)
    assert cli.train_main(args(tmp_path, "base", "train.steps=6", "checkpoint.every=1")) == 1
    assert one_error_line(capsys.readouterr().err).endswith(
        "cannot write /x/ckpt/2: no space left on device (disk full)")


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nothing"], "nothing: no such folder"),
    (["{tmp}"], "neither a transformax-train run folder (no config.yaml) nor a Hugging Face"),
    (["{run}", "--ids", "99999"], "--ids: token id 99999 is outside the model's vocabulary "
                                  "(ids 0 to 255)"),
    (["{run}", "--prompt", ""], "empty prompt: pass --prompt TEXT or --ids"),
    (["{run}", "--max-new-tokens", "40"], "max_len=41 exceeds the model's block_size=32"),
])
def test_generate_errors_are_one_line(finished, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=finished) for a in argv]
    assert cli.generate_main(["--prompt", "a", *argv]) == 1
    assert message in one_error_line(capsys.readouterr().err, "transformax-generate")


@pytest.mark.parametrize("argv, message", [
    (["--num", "0"], "argument --num: expected an integer >= 1, got '0'"),
    (["--temperature", "nan"], "argument --temperature: expected a number >= 0, got 'nan'"),
    (["--ids", "-3"], "argument --ids: expected a token id >= 0, got '-3'"),
    (["--top-p", "0"], "argument --top-p: expected a number in (0, 1], got 0.0"),
])
def test_generate_usage_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.generate_main([str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert message in one_error_line(capsys.readouterr().err, "transformax-generate")


def start(out, name, *extra):
    """``transformax-train`` in a subprocess, a long run logging every step."""
    env = dict(os.environ, TRANSFORMAX_NO_REEXEC="1")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"),
         *args(out, name, "train.steps=100000", "checkpoint.every=100000", *extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [r["step"] for r in map(json.loads, text.splitlines()[:-1]) if "loss" in r]


def wait_for_step(proc, run: Path, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if logged_steps(run) and logged_steps(run)[-1] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(proc.communicate()[1][-3000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_last_step_and_a_second_run_is_refused(tmp_path, capsys, sig):
    proc = start(tmp_path, "sig")
    run = tmp_path / "sig"
    wait_for_step(proc, run, 3)
    # A second run on the same folder while the first is alive.
    assert cli.train_main(args(tmp_path, "sig", "train.steps=100000")) == 1
    assert f"is in use by pid {proc.pid} on " in one_error_line(capsys.readouterr().err)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    saved = Checkpoints(run / "checkpoints", 3).all_steps()
    assert len(saved) == 1 and saved[0] >= 3
    assert err.strip() == (f"transformax-train: {sig.name}: stopped at step {saved[0]}; saved "
                           f"checkpoint {run.absolute()}/checkpoints/{saved[0]} (run the same "
                           f"command again to resume)")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, saved[0] + 1))
    assert not (run / LOCK_FILE).exists()


def test_a_second_signal_exits_at_once():
    """The first signal only asks the loop to stop (here: a loop that never does); the second
    ends the process with 128 + signal."""
    script = ("import sys, time\n"
              "from transformax.train.interrupt import stop_on_signals\n"
              "with stop_on_signals() as request:\n"
              "    print('ready', flush=True)\n"
              "    while not request: time.sleep(0.01)\n"
              "    print(request.name, flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "SIGINT\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err == "transformax-train: second SIGINT: exiting now without saving\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_jax_imports_is_one_line(tmp_path, sig):
    """Before the loop (importing JAX, loading the config) a signal ends the command with one
    line and ``128 + signal``: nothing to save yet, and no traceback."""
    proc = start(tmp_path, "early")
    proc_dir, deadline = Path(f"/proc/{proc.pid}"), time.time() + 60
    while time.time() < deadline and not (  # exec'd (a forked child maps our jaxlib), importing
            b"train.py" in (proc_dir / "cmdline").read_bytes()
            and "jaxlib" in (proc_dir / "maps").read_text()):
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err == f"transformax-train: interrupted ({sig.name})\n"
