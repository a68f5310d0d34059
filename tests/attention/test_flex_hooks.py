"""score_mod / mask_mod hooks run on whole tiles (``tile_hooks``), the form the Pallas kernels
compile: indexing a captured array becomes loads at the tile's positions. Checked against the
elementwise (vmap) evaluation every other kernel uses; which kernel can run which hook; and that
hooks gathering from captured arrays lower for cuda (Triton) and, read per batch/head, for tpu
(Mosaic), with no GPU or TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx
from attention.test_lowering import MOSAIC_CALL, TRITON_CALL, lowered
from transformax.attention import tile_hooks, tile_math
from transformax.attention.backends import pallas_tpu, pallas_triton
from transformax.attention.problem import Problem, hoist

I32 = jnp.int32
TABLE = jnp.linspace(-1.0, 1.0, 24)
SLOPES = jnp.array([0.5, 2.0])
IDS = jnp.array([[0, 0, 1, 1, 2, 2, 2, 0], [3, 3, 3, 1, 1, 0, 0, 0]])
SCORE_MODS = {
    "alibi": lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q),
    "relative_bias": lambda s, b, h, q, kv: s + TABLE[kv - q + 12],
    "clipped_bias_whole_read": lambda s, b, h, q, kv: (
        s + 2.0 * TABLE[jnp.clip(kv - q, 0, 23)] - jnp.max(TABLE)),
    "softcap_reshaped_index": lambda s, b, h, q, kv: (
        3.0 * jnp.tanh(s / 3.0) + jnp.reshape(q - kv, ())),
}
MASK_MODS = {
    "documents_chained": lambda b, h, q, kv: IDS[b][jnp.minimum(q, 7)] == IDS[b, kv],
    "per_batch_offset": lambda b, h, q, kv: kv <= q + jnp.array([0, 2])[b],
}


def _hoisted(name):
    if name in SCORE_MODS:
        return hoist(SCORE_MODS[name], name, jnp.float32, I32, I32, I32, I32)
    return hoist(MASK_MODS[name], name, I32, I32, I32, I32)


def _tile_args(name, b=1, h=1):
    q, kv = jnp.arange(6, dtype=I32)[:, None], jnp.arange(8, dtype=I32)[None, :]
    scores = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8)), jnp.float32)
    return ((scores,) if name in SCORE_MODS else ()) + (I32(b), I32(h), q, kv)


@pytest.mark.parametrize("name", [*SCORE_MODS, *MASK_MODS])
def test_tile_evaluation_matches_elementwise(name):
    fn, consts = _hoisted(name)
    args = _tile_args(name)
    want = tile_math.elementwise(fn, args, consts)
    got = tile_hooks.evaluate(fn, args, consts)
    jitted = jax.jit(lambda a, c: tile_hooks.evaluate(fn, a, c))(args, consts)
    assert got.shape == want.shape == (6, 8) and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jitted, want, rtol=1e-6, atol=1e-6)


def test_loads_are_reported_per_captured_array():
    assert tile_hooks.check(_hoisted("alibi")[0]) == (((),),)
    assert tile_hooks.check(_hoisted("relative_bias")[0]) == (((2, 3),),)
    assert tile_hooks.check(_hoisted("clipped_bias_whole_read")[0]) == (((2, 3), None),)
    assert tile_hooks.check(_hoisted("documents_chained")[0]) == (((2, 1), (1, 3)),)
    assert tile_hooks.scalar_only(_hoisted("alibi")[0]) == (True,)
    assert tile_hooks.scalar_only(_hoisted("relative_bias")[0]) == (False,)


def _problem(score=None, mask=None) -> Problem:
    score_fn = mask_fn = None
    if score:
        score_fn = hoist(score, "score_mod", jnp.float32, I32, I32, I32, I32)[0]
    if mask:
        mask_fn = hoist(mask, "mask_mod", I32, I32, I32, I32)[0]
    return Problem(2, 2, 2, 8, 8, 16, 16, np.dtype(np.float32), 0.25, mask_fn=mask_fn,
                   score_fn=score_fn)


def test_which_kernel_runs_which_hook():
    """Triton loads at any position; Mosaic only one element at (b, h) positions, from SMEM;
    a gather with no load form (``jnp.take``) is named."""
    per_element = _problem(SCORE_MODS["relative_bias"], MASK_MODS["documents_chained"])
    per_head = _problem(SCORE_MODS["alibi"], MASK_MODS["per_batch_offset"])
    for p in (per_element, per_head):
        assert pallas_triton.reasons_unsupported(p, "cuda") == []
    assert pallas_tpu.reasons_unsupported(per_head, "tpu") == []
    assert pallas_tpu.reasons_unsupported(per_element, "tpu") == [
        f"its {name} reads a captured array at per-element positions (a vector gather), "
        f"which the Pallas tpu lowering does not support" for name in ("mask_mod", "score_mod")]
    take = _problem(lambda s, b, h, q, kv: s + jnp.take(TABLE, kv))
    message = ("its score_mod cannot run on tiles here: broadcast_in_dim on values that "
               "differ per element (of shapes ['int32[]'])")
    assert pallas_triton.reasons_unsupported(take, "cuda") == [message]
    with pytest.raises(tile_hooks.Unsupported, match="broadcast_in_dim"):
        tile_hooks.check(take.score_fn)


LONG = jnp.linspace(-1.0, 1.0, 512)
DOCS = jnp.repeat(jnp.array([[0, 1, 0, 1], [2, 2, 3, 2]]), 64, axis=1)


def gathers():
    """Per-element gathers in both hooks: a relative-bias table, and a documents mask_mod whose
    rows see several spans (so the kernel evaluates it: its hull is not exact)."""
    return (lambda s, b, h, i, j: s + LONG[j - i + 255],
            lambda b, h, i, j: DOCS[b, i] == DOCS[b, j])


def per_head():
    """Reads at (b, h) positions only: ALiBi slopes, a per-batch offset (of a mask that is not
    one span per row either)."""
    slopes, offsets = jnp.linspace(0.1, 1.0, 4), jnp.array([0, 9])
    return (lambda s, b, h, i, j: s + slopes[h] * (j - i),
            lambda b, h, i, j: (j <= i + offsets[b]) | (j % 7 == 0))


@pytest.mark.parametrize("platform, call, hooks", [
    ("cuda", TRITON_CALL, gathers), ("tpu", MOSAIC_CALL, per_head)])
def test_hooks_reading_captured_arrays_lower_to_the_pallas_kernels(platform, call, hooks):
    score_mod, mask_mod = hooks()
    mask = tfx.create_block_mask(mask_mod, 2, None, 256, 256)
    assert not mask.exact

    def attend(q, k, v):
        return tfx.flex_attention(q, k, v, score_mod, mask)

    def attend_grad(q, k, v):
        return jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
            q, k, v)

    assert lowered(attend, [platform]).count(call) == 1
    assert lowered(attend_grad, [platform]).count(call) == 3
