"""The cuDNN kernel: the reasons it reports everywhere, and results against ``math`` on a GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx
from transformax.attention import select
from transformax.attention.backends import cudnn, pallas_common
from transformax.attention.backends import math as math_kernel
from transformax.attention.problem import Extras, Problem

BASE = Problem(batch=2, q_heads=8, kv_heads=2, q_len=128, kv_len=256, head_dim=64,
               v_head_dim=64, dtype=np.dtype(jnp.bfloat16), scale=0.125, causal_offset=0)


def _has_gpu() -> bool:
    return pallas_common.cuda_capability() is not None


@pytest.mark.skipif(_has_gpu(), reason="checks the reasons given where there is no GPU")
def test_reasons_without_cuda():
    assert cudnn.reasons_unsupported(BASE, "cuda") == [
        "cuDNN is not available to this jaxlib (needs jax[cuda])"]


def test_reasons_for_what_cudnn_cannot_run():
    p = dataclasses.replace(BASE, dtype=np.dtype(jnp.float32), head_dim=100, v_head_dim=64,
                            causal_offset=128, dropout_p=0.1)
    reasons = select.reasons_unsupported(select.Backend.CUDNN, p, "cuda")
    max_dim = "256" if _has_gpu() and pallas_common.cuda_capability() >= (9, 0) else "128"
    for expected in ("dtype float32 is not supported (float16, bfloat16)",
                     f"head dim E=100 must be a multiple of 8 and at most {max_dim}",
                     "Ev=64 != E=100 (jax.nn needs equal head dims)",
                     "causal alignment other than top-left (offset 128)",
                     "dropout: not supported by this kernel"):
        assert any(r.startswith(expected) for r in reasons), (expected, reasons)
    masked = dataclasses.replace(BASE, causal_offset=None, q_len=127, mask_dtype=np.dtype(bool),
                                 mask_shape=(1, 1, 127, 256))
    assert any("even L and S" in r for r in cudnn.reasons_unsupported(masked, "cuda"))
    additive = dataclasses.replace(masked, q_len=128, mask_dtype=np.dtype(jnp.float32),
                                   mask_shape=(1, 1, 128, 256))
    assert "float (additive) masks are not supported by this kernel" in (
        cudnn.reasons_unsupported(additive, "cuda"))


def _inputs(lq=128, s=256, hq=8, hk=2, e=64):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (2, hq, lq, e), jnp.bfloat16),
            jax.random.normal(keys[1], (2, hk, s, e), jnp.bfloat16),
            jax.random.normal(keys[2], (2, hk, s, e), jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("kind", ["plain", "causal", "bool_mask"])
def test_cudnn_against_math(kind):
    q, k, v = _inputs()
    kwargs = {"enable_gqa": True}
    if kind == "causal":
        kwargs["is_causal"] = True
    if kind == "bool_mask":
        mask = jax.random.bernoulli(jax.random.key(1), 0.6, (2, 1, 128, 256))
        kwargs["attn_mask"] = mask.at[:, :, 5:7].set(False)  # rows that see nothing

    def loss(q, k, v):
        out, lse = tfx.sdpa(q, k, v, return_lse=True, **kwargs)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(lse > -jnp.inf, lse, 0))

    explanation = tfx.explain(q, k, v, **kwargs)
    assert next(r for r in explanation.rows
                if r.platform == "cuda" and r.backend == tfx.Backend.CUDNN).reasons == ()
    results = {}
    for backend in (tfx.Backend.CUDNN, tfx.Backend.MATH):
        with tfx.sdpa_kernel([backend]), jax.default_matmul_precision("highest"):
            results[backend] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
            out, lse = jax.jit(lambda q, k, v: tfx.sdpa(q, k, v, return_lse=True, **kwargs))(
                q, k, v)
            results[backend] += (out, lse)
    for got, want in zip(jax.tree.leaves(results[tfx.Backend.CUDNN]),
                         jax.tree.leaves(results[tfx.Backend.MATH])):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), finite)
        scale = float(np.max(np.abs(want[finite]))) or 1.0
        np.testing.assert_allclose(got[finite] / scale, want[finite] / scale, atol=3e-2)


@pytest.mark.parametrize("kind", ["causal", "bool_mask"])
def test_wrapper_with_xla_standing_in_for_cudnn(kind, monkeypatch):
    """The layout changes, the hidden-row fix-up and the ``dlse`` term, on cpu: jax.nn's XLA
    implementation stands in for cuDNN (same call, same outputs)."""
    stand_in = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation, **kw: stand_in(*a, implementation="xla", **kw))
    p = dataclasses.replace(BASE, q_len=32, kv_len=48, dtype=np.dtype(jnp.float32))
    mask = None
    if kind == "bool_mask":
        p = dataclasses.replace(p, causal_offset=None, mask_dtype=np.dtype(bool),
                                mask_shape=(2, 1, 32, 48))
        mask = jax.random.bernoulli(jax.random.key(1), 0.6, p.mask_shape).at[:, :, 5:7].set(False)
    with jax.default_matmul_precision("highest"):  # not TF32 where this runs on a GPU
        q, k, v = (x.astype(jnp.float32) for x in _inputs(lq=32, s=48))
        out, lse = jax.jit(lambda *a: cudnn.forward(p, *a))(q, k, v, Extras(mask))
        want_out, want_lse = jax.jit(lambda *a: math_kernel.forward(p, *a))(q, k, v, Extras(mask))
        np.testing.assert_allclose(out, want_out, atol=1e-5)
        np.testing.assert_allclose(lse, want_lse, atol=1e-5)
        keys = jax.random.split(jax.random.key(2))
        dout = jax.random.normal(keys[0], out.shape)
        backward = jax.jit(lambda *a: cudnn.backward(p, *a))
        reference = jax.jit(lambda *a: math_kernel.backward(p, *a))
        for dlse in (jnp.zeros_like(lse), jax.random.normal(keys[1], lse.shape)):
            grads = backward(q, k, v, Extras(mask), out, lse, dout, dlse)[:3]
            want = reference(q, k, v, Extras(mask), want_out, want_lse, dout, dlse)[:3]
            for got, ref in zip(grads, want):
                np.testing.assert_allclose(got, ref, atol=2e-5)


def test_a_custom_partitioning_op_inside_a_kernel_lowers_under_a_one_device_jit(monkeypatch):
    """jax's cuDNN attention is a ``custom_partitioning`` op; inside the primitive's lowering
    it asserted under a plain one-device ``jit`` (found on an H200). The same kind of op in the
    CPU kernel's place now lowers, and gives the kernel's values."""
    from jax.experimental.custom_partitioning import custom_partitioning

    from transformax.attention import primitive

    @custom_partitioning
    def same(x):
        return x

    same.def_partition(
        partition=lambda mesh, args, result: (mesh, lambda x: x, args[0].sharding,
                                              (args[0].sharding,)),
        infer_sharding_from_operands=lambda mesh, args, result: args[0].sharding,
        sharding_rule="b h l e -> b h l e")
    q = jax.random.normal(jax.random.key(0), (1, 2, 8, 16))
    want = jax.jit(lambda q: tfx.sdpa(q, q, q))(q)
    runner = primitive._RUNNERS[primitive.forward_p]
    monkeypatch.setitem(primitive._RUNNERS, primitive.forward_p,
                        lambda *args: [same(runner(*args)[0]), *runner(*args)[1:]])
    np.testing.assert_array_equal(jax.jit(lambda q: tfx.sdpa(q, q, q) + 0)(q), want)
