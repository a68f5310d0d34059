"""The native CPU kernel: it is what runs by default on CPU (seen in the HLO), jit agrees with
op-by-op execution, default tiles at a head dim of 128 with GQA, flash kernels keep memory O(L)
(seen in XLA's buffer assignment), and structured masks (key intervals, segment ids) run in it,
forward and backward, as the math kernel computes them."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiles import ISAS, pinned_tiles

import transformax as tfx
from transformax.attention.backends import cpu_flash
from transformax.attention.problem import Extras

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
    # Both run the same kernels; XLA fuses the loss's gradient (the kernels' dout) differently
    # from op by op, a few ulps apart (dk 1.4e-6 off at 4.04 on the AVX2 setting).
    for got, eager, want in zip(grads, grads_eager, grads_math):
        np.testing.assert_allclose(got, eager, atol=1e-6, rtol=1e-6)
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


# Structured masks in the native kernel: one shape (ragged against every tile below), Bm = 1 and
# Bm = B, unsorted segment ids, rows that see no key, against the math kernel.
B, HQ, HK, L, S, E = 2, 4, 2, 72, 88, 32
KEYS = jax.random.split(jax.random.key(1), 4)
QS = jax.random.normal(KEYS[0], (B, HQ, L, E))
KS, VS = (jax.random.normal(key, (B, HK, S, E)) for key in KEYS[1:3])
COTANGENT = jax.random.normal(KEYS[3], (B, HQ, L, E))
DOCS = np.repeat(np.array([[0, 1, 2], [3, 4, 4]]), [20, 30, 22], axis=1)
KV_DOCS = np.repeat(np.array([[0, 1, 2, 9], [3, 4, 4, 9]]), [24, 30, 26, 8], axis=1)
VALID = np.arange(S)[None] < np.array([[S], [0]])  # batch row 1: every key is padding
STRUCTURED = {
    "window": tfx.sliding_window(L, S, 20, lower_right=True),
    "window_right": tfx.band(L, S, 5, 9),
    "documents_causal": tfx.document_mask(DOCS, KV_DOCS) & tfx.causal_upper_left(L, S),
    "shuffled_ids": tfx.document_mask(DOCS[:, ::-1].copy(), KV_DOCS[:, ::-1].copy()),
    "prefix_lm": tfx.prefix_lm(L, S, jnp.array([7, 40])),
    "chunked": tfx.chunked(L, S, 24),
    "cache_padding": tfx.band(L, S, None, 0, offset=jnp.array([-30, 16]))
    & tfx.key_padding(VALID),
}
# (ISA, threads, forward tiles, backward tiles): ragged, entering key tiles off their start; 8
# threads split the backward of each (batch, key/value head) into key chunks.
TILES = {f"{isa}-small": (isa, 2, (16, 48), (24, 40)) for isa in ISAS}
TILES["chunked-backward"] = (ISAS[-1], 8, (16, 48), (8, 16))


def structured_loss(q, k, v, mask):
    out, lse = tfx.sdpa(q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)
    return jnp.sum(out * COTANGENT) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)


structured_grad = jax.jit(jax.value_and_grad(structured_loss, argnums=(0, 1, 2), has_aux=True))


def structured_results(kernel, mask, tiles=None):
    pinned = contextlib.nullcontext()
    if tiles is not None:
        isa, threads, fwd, bwd = tiles
        pinned = pinned_tiles(fwd, bwd, isa=isa, threads=threads)
    with tfx.sdpa_kernel(kernel), pinned:
        return structured_grad(QS, KS, VS, mask)


@functools.cache
def math_results(case):
    return structured_results(tfx.Backend.MATH, STRUCTURED[case])


@pytest.mark.parametrize("tiles", [None, *TILES.values()], ids=["default", *TILES])
@pytest.mark.parametrize("case", list(STRUCTURED))
def test_structured_masks_run_natively_and_match_math(case, tiles):
    mask = STRUCTURED[case]
    with tfx.sdpa_kernel(tfx.Backend.CPU_FLASH):
        assert "tfx_cpu_flash_bwd" in structured_grad.lower(QS, KS, VS, mask).as_text()
    (_, (out, lse)), grads = structured_results(tfx.Backend.CPU_FLASH, mask, tiles)
    (_, (want_out, want_lse)), want_grads = math_results(case)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=name)


def test_rows_that_see_no_key_give_zeros_lse_minus_inf_and_zero_gradients():
    (_, (out, lse)), (dq, dk, dv) = structured_results(tfx.Backend.CPU_FLASH,
                                                       STRUCTURED["cache_padding"])
    assert np.all(np.isneginf(lse[1])) and not np.any(out[1])  # batch row 1: all keys padding
    assert np.all(np.isneginf(lse[0, :, :30])) and np.all(np.isfinite(lse[0, :, 30:]))
    assert not np.any(dq[1]) and not np.any(dk[1]) and not np.any(dv[1])
    assert not np.any(dq[0, :, :30]) and np.all(np.isfinite(dq))


def test_structured_jit_matches_op_by_op():
    mask = STRUCTURED["documents_causal"]
    with tfx.sdpa_kernel(tfx.Backend.CPU_FLASH):
        want = tfx.sdpa(QS, KS, VS, attn_mask=mask, enable_gqa=True)
        with jax.disable_jit():
            got = tfx.sdpa(QS, KS, VS, attn_mask=mask, enable_gqa=True)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_native_call_names_malformed_structure_operands():
    problem = tfx.explain(QS, KS, VS, attn_mask=STRUCTURED["window"], enable_gqa=True).problem
    lo = jnp.zeros((1, L + 1), jnp.int32)
    extras = Extras(bounds=(lo, lo))
    cfg = cpu_flash.default_config(problem, "fwd")
    with pytest.raises(Exception, match="key intervals lo, hi must be int32 of one shape"):
        jax.block_until_ready(cpu_flash._forward_call(problem, cfg, QS, KS, VS, extras))
