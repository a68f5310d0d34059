"""Several processes: the ``dist`` config keys, ``jax.distributed`` start-up, and real runs of two
processes on this host against one process."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from transformax import cli, train
from transformax.train import config as config_lib
from transformax.train import sharding

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "gpt_tiny.yaml")
ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE")


@pytest.mark.parametrize("override, key, expected", [
    ("dist.coordinator=localhost", "dist.coordinator", "expected HOST:PORT"),
    ("dist.process_id=2", "dist.process_id", "expected 0 .. dist.num_processes - 1 = 1"),
    ("dist.timeout_s=0", "dist.timeout_s", "expected >= 1"),
])
def test_dist_config_errors(override, key, expected):
    with pytest.raises(config_lib.ConfigError) as err:
        train.load(TINY, ["dist.coordinator=localhost:1234", "dist.num_processes=2", override])
    assert key in str(err.value) and expected in str(err.value)


@pytest.fixture
def calls(monkeypatch):
    """Records ``jax.distributed.initialize`` calls instead of making them."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    made = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: made.append((a, kw)))
    return made


def test_initialize_from_config_then_environment(calls, monkeypatch):
    assert not sharding.initialize_distributed(config_lib.DistConfig())
    assert calls == []
    cfg = config_lib.DistConfig(coordinator="host:1234", num_processes=2, process_id=1,
                                timeout_s=7)
    assert sharding.initialize_distributed(cfg)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "other:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert sharding.initialize_distributed(config_lib.DistConfig())
    timeouts = {"initialization_timeout": 60, "heartbeat_timeout_seconds": 60}
    assert calls == [(("host:1234", 2, 1), {"initialization_timeout": 7,
                                           "heartbeat_timeout_seconds": 7}),
                     (("other:99", 4, 3), timeouts)]
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError) as err:
        sharding.initialize_distributed(config_lib.DistConfig())
    assert str(err.value) == "environment variable JAX_NUM_PROCESSES='two': expected an integer"


def test_a_lost_peer_is_one_line_and_an_immediate_exit(monkeypatch, capsys):
    """A runtime error of a multi-process run becomes ``PeerLost`` (not in one process, nor
    other errors); the command prints it as one line and leaves with ``os._exit(1)``, skipping
    jax's exit-time shutdown barrier (it would abort the interpreter)."""
    error = jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Connection reset by "
                                       "peer\nmore")
    assert sharding.peer_lost(error) is None  # one process
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert sharding.peer_lost(ValueError("x")) is None
    lost = sharding.peer_lost(error)
    assert str(lost) == ("process 1 of 2 lost contact with another process (it stopped, or its "
                         "connection broke): UNKNOWN: Gloo all-reduce failed: Connection reset "
                         "by peer")

    def exit_now(status):
        raise SystemExit(f"os._exit({status})")

    def body():
        raise lost

    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(SystemExit, match=r"os\._exit\(1\)"):
        cli._guarded("transformax-train", False, body)
    assert capsys.readouterr().err == f"transformax-train: error: {lost}\n"


RUN = r"""
import json, sys
import jax
from transformax import train
out, tiny, stop_at, *overrides = sys.argv[1:]
common = [f"out_dir={out}", "log.progress=false", "sample.num=0", "train.steps=6",
          "train.batch_size=8", "log.every=1", "eval.every=0", "eval.batches=1",
          "checkpoint.every=3"]
result = train.train(train.load(tiny, common + overrides), stop_at=int(stop_at) or None)
qkv = result.state.params["blocks"][0]["attn"]["qkv"]["w"]
print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()),
                  "loss": [r["loss"] for r in result.records if "loss" in r],
                  "qkv": [list(qkv.sharding.spec), list(qkv.addressable_shards[0].data.shape)]}))
"""


def _launch(out, stop_at, *overrides, processes=1, port=0, command=None):
    """``processes`` runs of ``RUN`` (or of ``command``), ``dist.*`` set where more than one."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    command = command or [sys.executable, "-c", RUN, str(out), TINY, str(stop_at)]

    def dist(i):
        return [] if processes == 1 else [f"dist.coordinator=localhost:{port}",
                                          f"dist.num_processes={processes}",
                                          f"dist.process_id={i}", "dist.timeout_s=10"]

    return [subprocess.Popen([*command, *overrides, *dist(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _results(procs) -> list[dict]:
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mesh, qkv", [([], [[None, None], [64, 192]]),
                                       (["mesh.fsdp=2"], [[None, "fsdp"], [64, 96]])],
                         ids=["data", "fsdp"])
def test_two_processes_match_one_and_resume(tmp_path, mesh, qkv):
    """Two processes (one CPU device each, data parallel over both or FSDP across them, CPU
    collectives) train the same losses as one process; stopped at step 3 and restarted, they
    restore the collective checkpoint (FSDP: each process its half of the parameters and
    moments) and continue the same curve. Only process 0 writes the run folder's files."""
    port = random.randint(20000, 40000)
    one = _launch(tmp_path, 0, "name=one")
    first = _launch(tmp_path, 3, "name=two", *mesh, processes=2, port=port)
    want = _results(one)[0]["loss"]
    before = _results(first)
    after = _results(_launch(tmp_path, 0, "name=two", *mesh, processes=2, port=port + 1))
    assert [r["devices"] for r in before] == [2, 2] and len(want) == 6
    assert [r["qkv"] for r in before + after] == [qkv] * 4
    for process in (0, 1):
        got = before[process]["loss"] + after[process]["loss"]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    run = tmp_path / "two"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer: no line twice


@pytest.mark.slow
def test_a_killed_process_stops_the_others(tmp_path):
    """``transformax-train`` on two processes, process 1 killed mid-run: process 0 stops at its
    next collective with one line ``transformax-train: error: ...`` and status 1, within the
    heartbeat timeout (10 s), not jax's abort at exit (nor waiting forever)."""
    train_cli = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY,
                 f"out_dir={tmp_path}", "log.progress=false", "sample.num=0", "train.batch_size=8",
                 "log.every=1", "eval.every=0"]
    procs = _launch(tmp_path, 0, "name=kill", "train.steps=100000", "checkpoint.every=0",
                    processes=2, port=random.randint(20000, 40000), command=train_cli)
    metrics = tmp_path / "kill" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        assert time.time() < deadline and procs[0].poll() is None, "training did not start"
        time.sleep(0.5)
    procs[1].kill()
    killed = time.time()
    try:
        _, stderr = procs[0].communicate(timeout=90)
    finally:
        procs[0].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1 and time.time() - killed < 10, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in errors if line.startswith(
        "transformax-train: error: process 0 of 2 lost contact with another process (it "
        "stopped, or its connection broke): ")] and len(errors) == 1, stderr[-3000:]
    assert "Check failure" not in stderr and "Terminating process" not in stderr
