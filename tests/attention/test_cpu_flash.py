"""The native CPU kernel: it is what runs by default on CPU (seen in the HLO), jit agrees with
op-by-op execution, default tiles at a head dim of 128 with GQA, and flash kernels keep memory
O(L) (seen in XLA's buffer assignment)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx

RNG = np.random.default_rng(0)
Q = jnp.asarray(RNG.standard_normal((1, 4, 260, 128)), jnp.float32)
KV = jnp.asarray(RNG.standard_normal((1, 2, 260, 128)), jnp.float32)


def loss(q, k, v):
    out, lse = tfx.sdpa(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(lse), out


grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def test_default_cpu_kernel_is_the_native_one_in_the_hlo():
    hlo = jax.jit(grad).lower(Q, KV, KV).as_text()
    assert "tfx_cpu_flash_fwd" in hlo and "tfx_cpu_flash_bwd" in hlo
    with tfx.sdpa_kernel(tfx.Backend.XLA_FLASH):
        assert "tfx_cpu_flash" not in jax.jit(grad).lower(Q, KV, KV).as_text()


def test_jit_matches_op_by_op_and_math_at_head_dim_128_with_gqa():
    (value, out), grads = jax.jit(grad)(Q, KV, KV)
    with jax.disable_jit():
        (value_eager, out_eager), grads_eager = grad(Q, KV, KV)
    with tfx.sdpa_kernel(tfx.Backend.MATH):
        (value_math, out_math), grads_math = jax.jit(grad)(Q, KV, KV)
    np.testing.assert_allclose(out, out_eager, atol=1e-6)
    np.testing.assert_allclose(out, out_math, atol=2e-5)
    np.testing.assert_allclose(value, value_math, rtol=1e-5)
    for got, eager, want in zip(grads, grads_eager, grads_math):
        np.testing.assert_allclose(got, eager, atol=1e-6)
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", [tfx.Backend.CPU_FLASH, tfx.Backend.XLA_FLASH])
def test_flash_kernels_do_not_materialise_the_scores(backend):
    q = jnp.zeros((1, 2, 1024, 32), jnp.float32)
    scores_bytes = 2 * 1024 * 1024 * 4

    def temp_bytes(kernel):
        with tfx.sdpa_kernel(kernel):
            compiled = jax.jit(jax.grad(lambda q: jnp.sum(tfx.sdpa(q, q, q, is_causal=True)))
                               ).lower(q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(tfx.Backend.MATH) >= scores_bytes  # the probe can see materialisation
    assert temp_bytes(backend) < scores_bytes / 2
