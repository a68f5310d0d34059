"""Kernel configurations: host-derived defaults, pins, the on-disk tuning cache and the tuner."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx
from transformax import host, tuning
from transformax.attention import tune
from transformax.attention.backends import cpu_flash, xla_flash
from transformax.attention.problem import Problem

Q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 24, 16)), jnp.float32)
PROBLEM = Problem(1, 8, 8, 2048, 2048, 64, 64, np.dtype(np.float32), 0.125, causal_offset=0)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRANSFORMAX_AUTOTUNE", raising=False)
    return tmp_path


def cpu_config(report, pass_="fwd"):
    chosen = next(v for v in report.rows if v.platform == "cpu" and v.chosen)
    return chosen.config


def test_defaults_follow_the_l2_size(monkeypatch):
    real = host.current()
    full = dataclasses.replace(PROBLEM, causal_offset=None)
    monkeypatch.setattr(host, "current", lambda: dataclasses.replace(real, l2=2 * 2**20))
    big = cpu_flash.default_config(full, "fwd")
    assert (big.block_q, big.block_k) == (256, 512)
    monkeypatch.setattr(host, "current", lambda: dataclasses.replace(real, l2=512 * 2**10))
    small = cpu_flash.default_config(full, "fwd")
    assert (small.block_q, small.block_k) == (128, 256)
    assert cpu_flash.working_set(full, "fwd", small.block_q, small.block_k) <= 0.75 * 2**19
    causal = cpu_flash.default_config(PROBLEM, "fwd")
    assert (causal.block_q, causal.block_k) == (128, 256)
    assert cpu_flash.default_config(PROBLEM, "bwd").block_k == 128
    assert xla_flash.default_config(PROBLEM, "fwd") == xla_flash.Config(128, 128)


def test_isa_is_capped_by_xla_flags_and_the_override(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    if host.current().isa != "none":
        assert host.current().isa == "avx2"
        assert cpu_flash.default_config(PROBLEM, "fwd").isa == "avx2"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("TRANSFORMAX_CPU_ISA", "none")
    assert host.current().isa == "none"
    q = jnp.ones((1, 1, 4, 8))
    verdicts = {v.backend: v for v in tfx.explain(q, q, q).rows if v.platform == "cpu"}
    assert "lacks AVX2+FMA" in verdicts[tfx.Backend.CPU_FLASH].describe()


def test_a_pinned_config_is_honoured_and_explained():
    pinned = cpu_flash.Config(block_q=8, block_k=16, threads=1, isa="avx2")
    with tfx.kernel_config(tfx.Backend.CPU_FLASH, pinned):
        assert f"{pinned} (pinned)" in cpu_config(tfx.explain(Q, Q, Q))
        hlo = jax.jit(lambda q: tfx.sdpa(q, q, q)).lower(Q).as_text()
    assert "tfx_cpu_flash_fwd" in hlo and "block_q = 8" in hlo and "block_k = 16" in hlo
    assert "(default)" in cpu_config(tfx.explain(Q, Q, Q))


def test_tuning_writes_the_cache_and_later_calls_reuse_it(cache_dir):
    report = tfx.autotune(Q, Q, Q, is_causal=True)
    assert "(tuned)" in cpu_config(report)
    files = list(cache_dir.glob("tuning-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["host"]["fingerprint"] == host.current().fingerprint()
    key = f"cpu_flash/fwd/{tune.problem_class(tfx.explain(Q, Q, Q, is_causal=True).problem)}"
    assert key in data["entries"]
    again = tfx.explain(Q, Q, Q, is_causal=True)
    assert "(cache)" in cpu_config(again)
    assert cpu_config(again).replace("(cache)", "(tuned)") == cpu_config(report)
    out = tfx.sdpa(Q, Q, Q, is_causal=True)
    with tfx.sdpa_kernel(tfx.Backend.MATH):
        np.testing.assert_allclose(out, tfx.sdpa(Q, Q, Q, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable"),
    (json.dumps({"format": 1, "host": {"fingerprint": "0" * 16, "cpu": "Other CPU"},
                 "entries": {}}), "another host"),
    (json.dumps([1, 2]), "not a format-1"),
])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning(content, message):
    path = tuning.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match=message):
        report = tfx.explain(Q, Q, Q)
    assert "(default)" in cpu_config(report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(jax.jit(tfx.sdpa)(Q, Q, Q), tfx.sdpa(Q, Q, Q), atol=1e-6)


def test_the_choice_is_deterministic_given_the_cache():
    tuning.store("cpu_flash/fwd/" + tune.problem_class(PROBLEM),
                 cpu_flash.Config(64, 256, 1, "avx2"))
    first = tune.choose(cpu_flash, PROBLEM, "fwd")
    assert first == tune.choose(cpu_flash, PROBLEM, "fwd")
    assert first == tuning.Choice(cpu_flash.Config(64, 256, 1, "avx2"), "cache")


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_q=0, block_k=64, threads=1, isa="avx2"), "block_q must be in"),
    (dict(block_q=600, block_k=64, threads=1, isa="avx2"), "block_q=600"),
    (dict(block_q=64, block_k=64, threads=0, isa="avx2"), "threads must be"),
    (dict(block_q=64, block_k=64, threads=1, isa="sse"), "isa must be one of"),
])
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cpu_flash.Config(**kwargs)


def test_kernel_config_rejects_an_unknown_pass():
    with pytest.raises(ValueError, match="pass_ must be"):
        with tfx.kernel_config("cpu_flash", cpu_flash.Config(8, 8, 1, "avx2"), pass_="both"):
            pass
