"""Placement rules, and a run on 8 emulated CPU devices against the same run on one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from transformax.train import sharding
from transformax.train.config import MeshConfig

ROOT = Path(__file__).parents[2]


def fake_mesh(data=1, fsdp=1, tensor=1):
    """A mesh of the given shape over repeated CPU devices (only its shape is used)."""
    devices = np.array([jax.devices()[0]] * (data * fsdp * tensor)).reshape(data, fsdp, tensor)
    return Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("path, shape, mesh, expect", [
    ("blocks/0/ln_1/scale", (64,), dict(fsdp=4), P()),
    ("wte", (256, 64), dict(fsdp=4), P("fsdp", None)),
    ("blocks/0/attn/qkv/w", (64, 192), dict(fsdp=4), P(None, "fsdp")),
    ("blocks/0/attn/qkv/w", (64, 192), dict(fsdp=5), P(None, None)),  # nothing divisible
    ("blocks/0/attn/qkv/w", (64, 192), dict(fsdp=2, tensor=2), P("fsdp", "tensor")),
    ("blocks/0/mlp/proj/w", (256, 64), dict(fsdp=2, tensor=2), P("tensor", "fsdp")),
    ("opt_state/1/0/mu/blocks/0/mlp/fc/w", (64, 256), dict(tensor=4), P(None, "tensor")),
    ("wte", (256, 64), dict(data=8), P(None, None)),
])
def test_param_spec(path, shape, mesh, expect):
    assert sharding.param_spec(path, shape, fake_mesh(**mesh)) == expect


def test_single_device_mesh():
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


SCRIPT = r"""
import json, re, sys
import jax
from transformax import train
out, tiny = sys.argv[1], sys.argv[2]
common = [f"out_dir={out}", "log.progress=false", "sample.num=0", "train.steps=8",
          "train.batch_size=16", "log.every=1", "eval.every=0", "eval.batches=1",
          "checkpoint.every=0", "model.dropout=0.1"]
one = train.train(train.load(tiny, common + ["name=one"]), devices=jax.devices()[:1])
eight = train.train(train.load(tiny, common + ["name=eight", "mesh.data=2", "mesh.fsdp=4"]))
hlo = eight.train_step.as_text()
gathers = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", hlo)
params = eight.state.params
print(json.dumps({
    "devices": len(jax.devices()),
    "one": [r["loss"] for r in one.records if "loss" in r],
    "eight": [r["loss"] for r in eight.records if "loss" in r],
    "qkv_spec": list(params["blocks"][0]["attn"]["qkv"]["w"].sharding.spec),
    "qkv_shard": list(params["blocks"][0]["attn"]["qkv"]["w"].addressable_shards[0].data.shape),
    "mu_spec": list(eight.state.opt_state[1][0].mu["wte"].sharding.spec),
    "gathered": gathers,
    "param_shapes": sorted({f"f32[{','.join(map(str, x.shape))}]"
                            for x in jax.tree.leaves(params)}),
}))
"""


@pytest.mark.slow  # the 8-device attention test in test_primitive.py stays in the default run
def test_eight_devices_match_one_and_shard_the_params(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(ROOT / "configs" /
                                                                             "gpt_tiny.yaml")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    np.testing.assert_allclose(r["eight"], r["one"], rtol=1e-5)
    assert r["one"][-1] < r["one"][0]
    assert r["qkv_spec"] == [None, "fsdp"] and r["qkv_shard"] == [64, 48]
    assert r["mu_spec"] == ["fsdp", None]  # optimizer moments sharded alike
    # FSDP gathers parameters only: never activations (whole batch or all heads).
    assert r["gathered"] and set(r["gathered"]) <= set(r["param_shapes"])
