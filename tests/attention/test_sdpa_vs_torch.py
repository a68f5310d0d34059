"""tfx.sdpa against torch.nn.functional.scaled_dot_product_attention: outputs and gradients,
each CPU kernel forced in turn, over shapes, masks, GQA, scale and causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch
from tiles import ISAS, pinned_tiles
from torch_reference import torch_sdpa

import transformax as tfx

KERNELS = [tfx.Backend.MATH, tfx.Backend.XLA_FLASH, tfx.Backend.CPU_FLASH]


@pytest.fixture(autouse=True)
def small_tiles():
    """Small tiles, different in the backward pass, so that small shapes still cover several (and
    ragged) tiles."""
    with pinned_tiles((8, 16), (16, 8), isa=ISAS[-1]):
        yield


def run(kernel, q, k, v, cotangent, with_mask_grad=False, **kwargs):
    """Jitted output and gradients of tfx.sdpa under one forced kernel."""
    mask = kwargs.pop("attn_mask", None)

    def f(q, k, v, mask):
        return tfx.sdpa(q, k, v, attn_mask=mask, **kwargs)

    with tfx.sdpa_kernel([kernel]):
        argnums = (0, 1, 2, 3) if with_mask_grad else (0, 1, 2)
        out, vjp = jax.vjp(lambda *a: jax.jit(f)(*a, *([mask] if len(a) == 3 else [])),
                           *(q, k, v, mask)[:len(argnums)])
        return out, vjp(jnp.asarray(cotangent, out.dtype))


def check(q, k, v, atol=2e-5, rtol=2e-5, kernels=KERNELS, **kwargs):
    rng = np.random.default_rng(1)
    mask = kwargs.get("attn_mask")
    mask_grad = mask is not None and not isinstance(mask, tfx.CausalMask) and mask.dtype != bool
    torch_kwargs = dict(kwargs)
    if isinstance(mask, tfx.CausalMask):
        torch_kwargs["attn_mask"] = np.asarray(mask.to_dense())
    out_shape = jax.eval_shape(lambda: tfx.sdpa(q, k, v, **kwargs)).shape
    cotangent = rng.standard_normal(out_shape).astype(np.float32)
    want, want_grads = torch_sdpa(q, k, v, cotangent, **torch_kwargs)
    for kernel in kernels:
        out, grads = run(kernel, q, k, v, cotangent, with_mask_grad=mask_grad, **kwargs)
        np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=atol, rtol=rtol,
                                   err_msg=f"{kernel} output")
        for name, got, ref in zip("qkvm", grads, want_grads):
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=atol * 5,
                                       rtol=rtol * 5, err_msg=f"{kernel} d{name}")


MASK_KINDS = ["none", "causal", "lower_right", "bool_full", "bool_keys", "float_rows"]


# Bottom-right causal masks whose diagonal lands on tile boundaries (tiles: 8 x 16 forward,
# 16 x 8 backward), for L < S and L > S.
@example(batch=(), kv_heads=1, groups=2, q_len=16, kv_len=32, head_dim=8, v_head_dim=8,
         mask_kind="lower_right", scale=None, seed=1)
@example(batch=(2,), kv_heads=2, groups=1, q_len=40, kv_len=24, head_dim=16, v_head_dim=8,
         mask_kind="lower_right", scale=0.3, seed=2)
@example(batch=(), kv_heads=1, groups=1, q_len=24, kv_len=40, head_dim=8, v_head_dim=16,
         mask_kind="causal", scale=None, seed=3)
# Dense masks (the derandomized draws below reach none of them), with ragged tiles and GQA.
@example(batch=(2,), kv_heads=1, groups=2, q_len=17, kv_len=33, head_dim=16, v_head_dim=8,
         mask_kind="bool_full", scale=-0.7, seed=4)
@example(batch=(2, 1), kv_heads=2, groups=2, q_len=27, kv_len=3, head_dim=16, v_head_dim=8,
         mask_kind="bool_keys", scale=0.3, seed=5)
@example(batch=(), kv_heads=2, groups=1, q_len=9, kv_len=40, head_dim=8, v_head_dim=16,
         mask_kind="float_rows", scale=None, seed=6)
# Each example compiles three kernels, forward and backward (~1.5 s): a quarter of the
# profile's examples besides the explicit ones (HYPOTHESIS_EXAMPLES scales it).
@settings(max_examples=max(1, settings.default.max_examples // 4))
@given(batch=st.sampled_from([(), (2,), (2, 1)]), kv_heads=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2]), q_len=st.integers(1, 40), kv_len=st.integers(1, 40),
       head_dim=st.sampled_from([8, 16]), v_head_dim=st.sampled_from([8, 16]),
       mask_kind=st.sampled_from(MASK_KINDS), scale=st.sampled_from([None, 0.3, -0.7]),
       seed=st.integers(0, 2**16))
def test_matches_torch(batch, kv_heads, groups, q_len, kv_len, head_dim, v_head_dim, mask_kind,
                       scale, seed):
    rng = np.random.default_rng(seed)
    heads = kv_heads * groups
    q = rng.standard_normal((*batch, heads, q_len, head_dim)).astype(np.float32)
    k = rng.standard_normal((*batch, kv_heads, kv_len, head_dim)).astype(np.float32)
    v = rng.standard_normal((*batch, kv_heads, kv_len, v_head_dim)).astype(np.float32)
    kwargs = {"scale": scale, "enable_gqa": groups > 1}
    if mask_kind == "causal":
        kwargs["is_causal"] = True
    elif mask_kind == "lower_right":
        kwargs["attn_mask"] = tfx.causal_lower_right(q_len, kv_len)
    elif mask_kind == "bool_full":
        kwargs["attn_mask"] = rng.random((*batch, heads, q_len, kv_len)) < 0.7
    elif mask_kind == "bool_keys":
        kwargs["attn_mask"] = rng.random((*batch, 1, 1, kv_len)) < 0.7
    elif mask_kind == "float_rows":
        kwargs["attn_mask"] = rng.standard_normal((q_len, kv_len)).astype(np.float32)
    check(q, k, v, **kwargs)


def test_broadcast_batch_dims_and_rank_two():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 1, 2, 9, 8)).astype(np.float32)
    k = rng.standard_normal((1, 4, 1, 11, 8)).astype(np.float32)
    v = rng.standard_normal((11, 8)).astype(np.float32)
    check(q, k, v, is_causal=True)
    check(q[0, 0, 0], k[0, 0, 0], v)


def test_key_value_heads_differ_under_gqa():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 9, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 11, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 11, 8)).astype(np.float32)
    check(q, k, v, enable_gqa=True)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 12, 8)).astype(np.float32) for _ in range(3))
    mask = np.ones((12, 12), bool)
    mask[3] = False
    mask[7, :] = False
    float_mask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    for kernel in KERNELS:
        for m in (mask, float_mask):
            out, grads = run(kernel, q, k, v, np.ones((2, 12, 8), np.float32), attn_mask=m)
            assert np.all(np.asarray(out)[:, [3, 7]] == 0)
            assert all(np.isfinite(np.asarray(g)).all() for g in grads)
            _, lse = tfx.sdpa(q, k, v, attn_mask=m, return_lse=True)
            assert np.all(np.asarray(lse)[:, [3, 7]] == -np.inf)
    # A lower-right causal mask with L > S hides the first L - S rows entirely.
    out = tfx.sdpa(q, k[:, :5], v[:, :5], attn_mask=tfx.causal_lower_right(12, 5))
    assert np.all(np.asarray(out)[:, :7] == 0) and np.all(np.asarray(out)[:, 7:] != 0)


@pytest.mark.parametrize("dtype, atol", [(jnp.bfloat16, 1e-2), (jnp.float16, 4e-3)])
def test_half_precision_close_to_f32(dtype, atol):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 24, 16)).astype(np.float32) for _ in range(3))
    rounded = [np.asarray(jnp.asarray(x, dtype), np.float32) for x in (q, k, v)]
    want, _ = torch_sdpa(*rounded, np.zeros((2, 2, 24, 16)), is_causal=True)
    for kernel in KERNELS:
        with tfx.sdpa_kernel([kernel]):
            out = jax.jit(lambda q, k, v: tfx.sdpa(q, k, v, is_causal=True))(
                *(jnp.asarray(x, dtype) for x in (q, k, v)))
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=atol, rtol=atol)


def test_lse_is_logsumexp_of_masked_scaled_scores():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 10, 8)).astype(np.float32) for _ in range(3))
    scores = np.einsum("hle,hse->hls", q, k) * 0.5
    scores = np.where(np.tril(np.ones((10, 10), bool)), scores, -np.inf)
    want = np.log(np.exp(scores).sum(-1))
    for kernel in KERNELS:
        with tfx.sdpa_kernel([kernel]):
            _, lse = tfx.sdpa(q, k, v, is_causal=True, scale=0.5, return_lse=True)
        assert lse.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(lse), want, atol=1e-5, rtol=1e-5)


def test_lse_gradient_matches_math():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 20, 8)).astype(np.float32) for _ in range(3))

    def loss(q, k, v):
        out, lse = tfx.sdpa(q, k, v, is_causal=True, return_lse=True)
        return jnp.sum(out * out) + jnp.sum(jnp.sin(lse))

    grads = {}
    for kernel in KERNELS:
        with tfx.sdpa_kernel([kernel]):
            grads[kernel] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for kernel in KERNELS[1:]:
        for a, b in zip(grads[kernel], grads[tfx.Backend.MATH]):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(kernel))


def test_empty_key_or_query_sequences():
    q = np.ones((2, 3, 4, 8), np.float32)
    empty = np.ones((2, 3, 0, 8), np.float32)
    want, _ = torch_sdpa(q, empty, empty, np.zeros((2, 3, 4, 8)))
    out, lse = tfx.sdpa(q, empty, empty, return_lse=True)
    np.testing.assert_array_equal(out, want)
    assert np.all(np.asarray(lse) == -np.inf)
    grad = jax.grad(lambda q: jnp.sum(tfx.sdpa(q, empty, empty)))(q)
    np.testing.assert_array_equal(grad, 0)
    assert tfx.sdpa(empty, q, q).shape == (2, 3, 0, 8)


def test_float64_accumulates_in_float64():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 30, 8)) for _ in range(3))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    want.sum().backward()
    with jax.enable_x64(True):
        for kernel in (tfx.Backend.MATH, tfx.Backend.XLA_FLASH):  # cpu_flash is f32-only
            with tfx.sdpa_kernel([kernel]):
                out, grads = jax.jit(jax.value_and_grad(
                    lambda *a: jnp.sum(tfx.sdpa(*a, is_causal=True)), argnums=(0, 1, 2)))(
                    *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, want.sum().item(), rtol=1e-12)
            for got, t in zip(grads, (tq, tk, tv)):
                np.testing.assert_allclose(got, t.grad.numpy(), atol=1e-12)


def test_cpu_flash_refuses_float64_with_a_reason():
    with jax.enable_x64(True):
        q = jnp.ones((1, 2, 4, 8), jnp.float64)
        verdicts = {v.backend: v for v in tfx.explain(q, q, q).rows if v.platform == "cpu"}
        assert "float32" in verdicts[tfx.Backend.CPU_FLASH].describe()
        assert tfx.explain(q, q, q).chosen("cpu") == tfx.Backend.XLA_FLASH


@pytest.mark.parametrize("isa, fwd, bwd, threads", [("avx2", (8, 24), (16, 8), 1),
                                                    (ISAS[-1], (64, 32), (8, 64), 2)])
def test_cpu_flash_configs_match_torch(isa, fwd, bwd, threads):
    """Every code path (ISA) and tile shape, with ragged tiles, GQA, both causal alignments,
    masks and dropout, against torch (through `check`) and math (dropout)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 37, 24)).astype(np.float32)
    k = rng.standard_normal((2, 2, 45, 24)).astype(np.float32)
    v = rng.standard_normal((2, 2, 45, 40)).astype(np.float32)
    only = [tfx.Backend.CPU_FLASH]
    with pinned_tiles(fwd, bwd, isa, threads):
        check(q, k, v, kernels=only, is_causal=True, enable_gqa=True)
        check(q, k, v, kernels=only, attn_mask=tfx.causal_lower_right(37, 45), enable_gqa=True,
              scale=-0.4)
        check(q, k, v, kernels=only, enable_gqa=True,
              attn_mask=rng.standard_normal((1, 4, 37, 45)).astype(np.float32))
        check(q, k, v, kernels=only, attn_mask=rng.random((2, 1, 1, 45)) < 0.6, enable_gqa=True)
        cotangent = rng.standard_normal((2, 4, 37, 40)).astype(np.float32)
        kwargs = dict(is_causal=True, enable_gqa=True, dropout_p=0.3,
                      dropout_rng=jax.random.key(5))
        want = run(tfx.Backend.MATH, q, k, v, cotangent, **kwargs)
        got = run(tfx.Backend.CPU_FLASH, q, k, v, cotangent, **kwargs)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_half_precision_accumulates_in_float32_across_many_tiles(kernel):
    """bf16 inputs over 32 key tiles: the output is within one bf16 rounding of the f32 result
    (an accumulator rounded to bf16 after each tile would drift far past that)."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 256, 16)), jnp.bfloat16) for _ in range(3))
    with tfx.sdpa_kernel(tfx.Backend.MATH):
        want = np.asarray(tfx.sdpa(*(x.astype(jnp.float32) for x in (q, k, v))))
    with tfx.sdpa_kernel(kernel):
        got = np.asarray(jax.jit(tfx.sdpa)(q, k, v), np.float32)
    np.testing.assert_array_less(np.abs(got - want), np.abs(want) * 2.0**-8 + 1e-3)
