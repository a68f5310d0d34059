"""The schema, strict merging and the error messages."""

from pathlib import Path

import pytest

from transformax.train import config
from transformax.train.config import ConfigError

CONFIGS = Path(__file__).parents[2] / "configs"
TINY = str(CONFIGS / "gpt_tiny.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = config.load(str(path))
    assert cfg.name == path.stem
    assert cfg.data.seq_len <= cfg.model_config.max_len


def test_yaml_then_overrides():
    cfg = config.load(TINY, ["train.steps=7", "optim.lr=0.5", "model.n_layer=3",
                             "optim.no_decay=[a,b]"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.n_layer) == (7, 0.5, 3)
    assert cfg.optim.no_decay == ["a", "b"]
    assert cfg.model.n_embd == 64  # from the YAML
    assert cfg.eval.batches == 2 and cfg.mesh.data == -1  # YAML, schema default


def test_defaults_without_file():
    cfg = config.load(None, ["model.n_layer=1", "model.block_size=256"])
    assert cfg.model.arch == "gpt" and cfg.data.source == "stdlib"


def test_round_trip_through_yaml(tmp_path):
    cfg = config.load(TINY, ["train.steps=9", "mesh.fsdp=2"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(str(path)) == cfg


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_model_section_follows_arch(arch):
    extra = ["model.n_kv_head=2"] if arch == "llama" else []
    cfg = config.load(None, [f"model.arch={arch}", "model.vocab_size=300", "model.n_layer=1",
                             "model.dim=32", "model.n_head=4", "model.hidden_dim=64",
                             "data.seq_len=64", *extra])
    assert type(cfg.model_config).__module__ == f"transformax.models.{arch}"
    assert cfg.model_config.dim == 32


@pytest.mark.parametrize("overrides, needles", [
    (["train.stepz=3"], ["train.stepz", "steps", "batch_size", "grad_accum"]),
    (["bogus=1"], ["bogus", "top level", "train", "mesh"]),
    (["model.n_embed=3"], ["model.n_embed", "n_embd", "block_size"]),
    (["train.steps=abc"], ["train.steps", "abc", "Integer"]),
    (["optim.lr=fast"], ["optim.lr", "fast"]),
    (["model.arch=rnn"], ["model.arch", "'rnn'", "bert", "gpt", "llama"]),
    (["data.source=web"], ["data.source", "stdlib", "text", "bin"]),
    (["data.source=text"], ["data.path", "needs a path"]),
    (["data.dtype=int8"], ["data.dtype", "uint16", "uint32"]),
    (["data.seq_len=65"], ["data.seq_len=65", "block_size=64"]),
    (["train.batch_size=9", "train.grad_accum=2"], ["train.batch_size=9", "grad_accum=2"]),
    (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1", ">= 0"]),
    (["model.vocab_size=100"], ["model.vocab_size=100", ">= 256"]),
    (["model.n_head=3"], ["model", "n_head=3"]),
    (["eval.batches=0"], ["eval.batches", ">= 1"]),
    (["train.steps"], ["train.steps", "key.sub=value"]),
])
def test_errors_name_the_key_and_allowed_values(overrides, needles):
    with pytest.raises(ConfigError) as e:
        config.load(TINY, overrides)
    for needle in needles:
        assert needle in str(e.value)


def test_bert_needs_a_mask_token():
    with pytest.raises(ConfigError, match=r"model.vocab_size=256.*>= 257.*\[MASK\]"):
        config.load(str(CONFIGS / "bert_mlm_small.yaml"), ["model.vocab_size=256"])


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml"):
        config.load("nope.yaml")


def test_batch_must_divide_over_devices():
    cfg = config.load(TINY, ["train.batch_size=12"])
    with pytest.raises(ConfigError, match=r"train.batch_size=12.*8 batch shards"):
        config.validate(cfg, n_devices=8)
    config.validate(config.load(TINY, ["train.batch_size=16"]), n_devices=8)


@pytest.mark.parametrize("mesh, n, expect", [
    ({}, 8, (8, 1, 1)),
    ({"fsdp": 4}, 8, (2, 4, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, 8, (1, 4, 2)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
])
def test_mesh_shape(mesh, n, expect):
    assert config.mesh_shape(config.MeshConfig(**mesh), n) == expect


@pytest.mark.parametrize("mesh, needle", [
    ({"fsdp": 3}, "must divide the 8 devices"),
    ({"data": 2, "fsdp": 2}, "product must equal the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"tensor": 0}, "mesh.tensor=0"),
])
def test_mesh_errors(mesh, needle):
    with pytest.raises(ConfigError, match=needle):
        config.mesh_shape(config.MeshConfig(**mesh), 8)
