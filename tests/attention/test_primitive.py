"""The attention primitive: one named op, jit/non-jit parity, vmap, lowering, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx

rng = np.random.default_rng(0)
Q, K, V = (jnp.asarray(rng.standard_normal((2, 3, 24, 8)), jnp.float32) for _ in range(3))


def loss(q, k, v):
    out, lse = tfx.sdpa(q, k, v, is_causal=True, return_lse=True)
    return jnp.sum(out ** 2) + jnp.sum(lse)


def test_one_named_op_in_jaxpr():
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: tfx.sdpa(q, k, v, is_causal=True))(Q, K, V))
    assert jaxpr.count("transformax_sdpa[") == 1
    assert "dot_general" not in jaxpr
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(Q, K, V))
    assert "transformax_sdpa_bwd[" in grad_jaxpr


@pytest.mark.parametrize("backend", [tfx.Backend.MATH, tfx.Backend.XLA_FLASH])
def test_jit_matches_no_jit(backend):
    mask = jnp.asarray(rng.random((24, 24)) < 0.8)
    f = jax.value_and_grad(lambda q, k, v: loss(q, k, v) + jnp.sum(
        tfx.sdpa(q, k, v, attn_mask=mask, dropout_p=0.3, dropout_rng=jax.random.key(3))),
        argnums=(0, 1, 2))
    with tfx.sdpa_kernel(backend):
        jitted = jax.jit(f)(Q, K, V)
        with jax.disable_jit():
            eager = f(Q, K, V)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_causal_mask_objects_jit_and_no_jit():
    for mask in (tfx.causal_upper_left(3, 5), tfx.causal_lower_right(3, 5)):
        np.testing.assert_array_equal(jax.jit(lambda m: m.to_dense())(mask), mask.to_dense())
    np.testing.assert_array_equal(tfx.causal_upper_left(3, 5).to_dense(), np.tri(3, 5, 0, bool))
    np.testing.assert_array_equal(tfx.causal_lower_right(3, 5).to_dense(), np.tri(3, 5, 2, bool))


def test_vmap_matches_batched_call_and_its_gradient():
    q, k, v = (jnp.stack([x, x * 0.5]) for x in (Q, K, V))
    mask = jnp.asarray(rng.random((2, 1, 24, 24)) < 0.8)
    f = lambda q, k, v, m: tfx.sdpa(q, k, v, attn_mask=m)  # noqa: E731
    np.testing.assert_allclose(jax.vmap(f)(q, k, v, mask), f(q, k, v, mask[:, None]), atol=1e-6)
    # Unbatched key/value and mask broadcast; gradients go through the batching rule too.
    got = jax.vmap(f, in_axes=(0, None, None, None))(q, K, V, mask[0])
    np.testing.assert_allclose(got, f(q, K[None], V[None], mask[0]), atol=1e-6)
    grads = jax.grad(lambda q: jnp.sum(jax.vmap(f, (0, None, None, None))(q, K, V, mask[0]) ** 2))(q)
    want = jax.grad(lambda q: jnp.sum(f(q, K[None], V[None], mask[0]) ** 2))(q)
    np.testing.assert_allclose(grads, want, atol=1e-5)


def test_vmap_with_dropout_keeps_each_examples_stream():
    keys = jax.random.split(jax.random.key(0), 2)
    f = lambda q, key: tfx.sdpa(q, K, V, dropout_p=0.5, dropout_rng=key)  # noqa: E731
    batched = jax.vmap(f)(jnp.stack([Q, Q]), keys)
    for i in range(2):
        np.testing.assert_allclose(batched[i], f(Q, keys[i]), atol=1e-6)


def test_cpu_lowering_is_plain_xla():
    text = jax.jit(lambda q, k, v: tfx.sdpa(q, k, v, is_causal=True)).lower(Q, K, V).as_text()
    assert "custom_call" not in text and "dot_general" in text


def test_float_mask_gradient_matches_math():
    mask = jnp.asarray(rng.standard_normal((3, 24, 1)), jnp.float32)
    grads = {}
    for backend in (tfx.Backend.MATH, tfx.Backend.XLA_FLASH):
        with tfx.sdpa_kernel(backend):
            grads[backend] = jax.grad(
                lambda m: jnp.sum(tfx.sdpa(Q, K, V, attn_mask=m) ** 2))(mask)
    assert grads[tfx.Backend.MATH].shape == mask.shape
    np.testing.assert_allclose(*grads.values(), atol=1e-5)


def test_sharded_jit_partitions_over_batch_and_heads():
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import transformax as tfx
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
        spec = NamedSharding(mesh, P("data", "tensor", None, None))
        q = jax.device_put(jnp.ones((4, 8, 32, 16)), spec)
        loss = lambda q: jnp.sum(tfx.sdpa(q, q, q, is_causal=True) ** 2)
        fwd = jax.jit(lambda q: tfx.sdpa(q, q, q, is_causal=True)).lower(q).compile()
        grad = jax.jit(jax.grad(loss)).lower(q).compile()
        for compiled in (fwd, grad):
            assert "all-gather" not in compiled.as_text(), "attention gathered its operands"
        assert fwd.output_shardings.spec[:2] == ("data", "tensor"), fwd.output_shardings
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
