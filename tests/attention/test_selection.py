"""Kernel selection: priorities, the sdpa_kernel context, explain()."""

import threading

import jax
import jax.numpy as jnp
import numpy as np

import transformax as tfx

Q = np.zeros((1, 2, 8, 16), np.float32)


def test_cpu_default_is_cpu_flash_and_explain_prints_every_kernel():
    report = tfx.explain(Q, Q, Q, is_causal=True)
    assert report.chosen("cpu") == tfx.Backend.CPU_FLASH
    text = str(report)
    assert "cpu:" in text and "cuda:" in text and "tpu:" in text
    assert "cpu_flash" in text and "chosen [fwd Config(block_q=" in text
    cpu_rows = {v.backend: v for v in report.rows if v.platform == "cpu"}
    assert cpu_rows[tfx.Backend.MATH].eligible
    assert cpu_rows[tfx.Backend.CUDNN].reasons


def test_sdpa_kernel_limits_and_orders():
    with tfx.sdpa_kernel([tfx.Backend.MATH]):
        assert tfx.explain(Q, Q, Q).chosen("cpu") == tfx.Backend.MATH
        verdict = {v.backend: v for v in tfx.explain(Q, Q, Q).rows if v.platform == "cpu"}
        assert verdict[tfx.Backend.XLA_FLASH].describe() == "excluded by sdpa_kernel"
    # Without set_priority the platform's order wins; with it, the list's order does.
    with tfx.sdpa_kernel([tfx.Backend.MATH, tfx.Backend.XLA_FLASH]):
        assert tfx.explain(Q, Q, Q).chosen("cpu") == tfx.Backend.XLA_FLASH
    with tfx.sdpa_kernel([tfx.Backend.MATH, tfx.Backend.XLA_FLASH], set_priority=True):
        assert tfx.explain(Q, Q, Q).chosen("cpu") == tfx.Backend.MATH
    assert tfx.explain(Q, Q, Q).chosen("cpu") == tfx.Backend.CPU_FLASH


def test_sdpa_kernel_is_per_thread():
    seen = {}
    ready, release = threading.Event(), threading.Event()

    def other():
        ready.wait()
        seen["other"] = tfx.explain(Q, Q, Q).chosen("cpu")
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with tfx.sdpa_kernel([tfx.Backend.MATH]):
        ready.set()
        release.wait()
        seen["inside"] = tfx.explain(Q, Q, Q).chosen("cpu")
    thread.join()
    assert seen == {"other": tfx.Backend.CPU_FLASH, "inside": tfx.Backend.MATH}


def test_kernels_agree():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 40, 16)).astype(np.float32) for _ in range(3))
    outs = []
    for backend in (tfx.Backend.MATH, tfx.Backend.XLA_FLASH, tfx.Backend.CPU_FLASH):
        with tfx.sdpa_kernel(backend):
            outs.append(np.asarray(tfx.sdpa(q, k, v, is_causal=True)))
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-5)


def test_explain_reports_cost_without_allocating_a_million_token_problem():
    big = jax.ShapeDtypeStruct((1, 8, 2**20, 64), jnp.float32)
    report = tfx.explain(big, big, big, is_causal=True)
    forward = 2.0 * 8 * (2**20 * (2**20 + 1) // 2) * 128
    assert report.problem.flops() == (forward, 3.5 * forward)
    text = str(report)
    assert f"{forward / 1e9:.4g} GFLOP forward" in text
    assert "cpu: (temporaries ~" in text and "GiB)" in text
    with tfx.sdpa_kernel(tfx.Backend.MATH):
        assert "cpu: (temporaries ~128 TiB)" in str(tfx.explain(big, big, big, is_causal=True))
