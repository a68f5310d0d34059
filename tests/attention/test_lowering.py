"""One traced function lowers to the right kernel per platform, also for several platforms at
once: Pallas Triton on cuda, Pallas Mosaic on tpu, plain XLA on cpu. No GPU or TPU needed."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import transformax as tfx
from transformax.attention.backends import pallas_common, pallas_triton
from transformax.attention.problem import Problem

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
SHAPE = jax.ShapeDtypeStruct((2, 4, 256, 64), jnp.bfloat16)


def attend(q, k, v):
    return tfx.sdpa(q, k, v, is_causal=True)


def attend_grad(q, k, v):
    return jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)


H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                   platform="cuda")


def _abstract_mesh(shape=(1,), names=("x",)):
    """Lowering Triton for cuda needs a GPU model; without a GPU, name an H100 (JAX 0.11 reads
    it from the abstract mesh; 0.10 falls back to sm90 by itself)."""
    return jax.sharding.AbstractMesh(shape, names, (AxisType.Explicit,) * len(shape),
                                     abstract_device=H100)


def _gpu_target():
    try:
        jax.devices("gpu")
        return contextlib.nullcontext()
    except RuntimeError:
        return jax.sharding.use_abstract_mesh(_abstract_mesh())


def lowered(fn, platforms, shape=SHAPE, target=None) -> str:
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with target or _gpu_target():
        exported = export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)(
            shape, shape, shape)
    return exported.mlir_module()


def test_one_attention_op_in_the_jaxpr():
    jaxpr = str(jax.make_jaxpr(attend_grad)(SHAPE, SHAPE, SHAPE))
    assert jaxpr.count("transformax_sdpa[") == 1
    assert jaxpr.count("transformax_sdpa_bwd[") == 1


@pytest.mark.parametrize("interpret", [False, True], ids=["plain", "interpret_env"])
def test_cuda_lowering_runs_the_triton_kernels(interpret, monkeypatch):
    """Interpret mode changes only what cpu runs: cuda still gets the compiled kernels."""
    if interpret:
        monkeypatch.setenv(pallas_common.INTERPRET_ENV, "1")
        jax.clear_caches()  # the kernels read the switch when traced
    forward = lowered(attend, ["cuda"])
    assert forward.count(TRITON_CALL) == 1 and "transformax_flash_fwd" in forward
    backward = lowered(attend_grad, ["cuda"])
    assert backward.count(TRITON_CALL) == 3  # forward, dq, dk/dv
    assert "transformax_flash_dq" in backward and "transformax_flash_dkdv" in backward


def test_cpu_export_is_plain_xla():
    """The native cpu kernel's FFI call has no serialization guarantee: exports use xla_flash."""
    for fn in (attend, attend_grad):
        assert "custom_call" not in lowered(fn, ["cpu"])
    assert "tfx_cpu_flash_fwd" in jax.jit(attend).lower(SHAPE, SHAPE, SHAPE).as_text()


def test_tpu_lowering_runs_the_mosaic_kernels():
    assert lowered(attend, ["tpu"]).count(MOSAIC_CALL) == 1
    assert lowered(attend_grad, ["tpu"]).count(MOSAIC_CALL) == 3


DOCS = jnp.repeat(jnp.array([[0, 1, 2, 3], [0, 0, 1, 1]]), 64, axis=1)


def attend_flex(q, k, v):
    """A structured mask (window and documents) and a score_mod (soft-capping)."""
    mask = tfx.sliding_window(256, 256, 96) & tfx.document_mask(DOCS)
    return tfx.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: 20.0 * jnp.tanh(s / 20.0),
                              block_mask=mask)


def attend_flex_grad(q, k, v):
    return jax.grad(lambda *a: attend_flex(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
        q, k, v)


@pytest.mark.parametrize("platform, call", [("cuda", TRITON_CALL), ("tpu", MOSAIC_CALL)])
def test_structured_mask_and_score_mod_lower_to_one_kernel_per_pass(platform, call):
    assert lowered(attend_flex, [platform]).count(call) == 1
    assert lowered(attend_flex_grad, [platform]).count(call) == 3


def test_multi_platform_lowering():
    """cpu, cuda and tpu in one module: each platform's kernel, behind a platform switch."""
    module = lowered(attend_grad, ["cpu", "cuda", "tpu"])
    assert module.count(TRITON_CALL) == 3 and module.count(MOSAIC_CALL) == 3
    assert "stablehlo.case" in module
    assert lowered(attend, ["cpu", "cuda"]).count(TRITON_CALL) == 1


@pytest.mark.parametrize("platform, call", [("cuda", TRITON_CALL), ("tpu", MOSAIC_CALL)])
def test_sharded_lowering_runs_each_kernel_on_its_shard(platform, call):
    """Batch over ``data`` (2) and heads over ``tensor`` (4) on an 8-device explicit mesh: every
    kernel call takes one device's (1, 1, 256, 64) shard of the (2, 4, 256, 64) operands, and
    nothing gathers them."""
    mesh = _abstract_mesh((2, 4), ("data", "tensor"))
    shape = jax.ShapeDtypeStruct(SHAPE.shape, SHAPE.dtype,
                                 sharding=NamedSharding(mesh, P("data", "tensor")))
    module = lowered(attend_grad, [platform], shape, jax.sharding.use_abstract_mesh(mesh))
    calls = [line for line in module.splitlines() if f"custom_call @{call}" in line]
    assert len(calls) == 3 and "sdy.manual_computation" in module
    local, whole = "tensor<1x1x256x64xbf16>", "tensor<2x4x256x64xbf16>"
    assert all(local in line and whole not in line for line in calls), calls
    assert "all_gather" not in module and "all_to_all" not in module


def _problem(dtype, e: int, length: int = 4096) -> Problem:
    return Problem(batch=1, q_heads=2, kv_heads=2, q_len=length, kv_len=length, head_dim=e,
                   v_head_dim=e, dtype=np.dtype(dtype), scale=1.0)


BWD_ROWS = ("block_q_dkv", "block_k_dkv", "block_q_dq")


def test_hopper_backward_tiles_for_tf32():
    """sm90 with f32 in TF32: backward tiles of >= 64 rows (wgmma's height) where the staged
    tiles fit an H100's shared memory (E <= 128), else as on sm80 (E = 256); IEEE f32 and 16-bit
    inputs keep the sm80 tiles (measured faster on an H100)."""
    default = pallas_triton.default_config
    for dtype, e in ((jnp.float32, 64), (jnp.float32, 128), (jnp.float32, 256),
                     (jnp.bfloat16, 128), (jnp.bfloat16, 256)):
        p = _problem(dtype, e)
        assert default(p, (9, 0)) == default(p, (8, 0)), (dtype, e)  # IEEE f32, 16-bit
        with jax.default_matmul_precision("tensorfloat32"):
            hopper, ampere = default(p, (9, 0)), default(p, (8, 0))
        assert ampere == default(p, (8, 0))
        if dtype == jnp.float32 and e <= 128:
            assert min(getattr(hopper, n) for n in BWD_ROWS) >= 64 and hopper.bwd_warps == 8
            assert pallas_triton.backward_smem(p, hopper) <= pallas_triton.HOPPER_SMEM
            assert min(getattr(ampere, n) for n in BWD_ROWS) < 64
        else:
            assert hopper == ampere, (dtype, e)
    wide = dataclasses.replace(default(_problem(jnp.float32, 256), (8, 0)), bwd_stages=1,
                               **{n: 64 for n in BWD_ROWS})
    assert pallas_triton.backward_smem(_problem(jnp.float32, 256), wide) > \
        pallas_triton.HOPPER_SMEM


@pytest.mark.parametrize("capability, grid, warps", [((9, 0), 4, 8), ((8, 0), 8, 4)])
def test_hopper_backward_tiles_lower_for_cuda(capability, grid, warps, monkeypatch):
    """f32 E=128 in TF32 lowers for cuda with the GPU's tiles: on sm90 the dk/dv kernel runs
    64-row key blocks (grid 256/64) on 8 warps, on sm80 32-row ones on 4."""
    monkeypatch.setattr(pallas_common, "cuda_capability", lambda: capability)
    jax.clear_caches()  # the kernels read the GPU's capability when traced
    shape = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.float32)
    with jax.default_matmul_precision("tensorfloat32"):
        module = lowered(attend_grad, ["cuda"], shape)
    dkdv = [line for line in module.splitlines()
            if TRITON_CALL in line and '"transformax_flash_dkdv"' in line]
    assert len(dkdv) == 1 and f"grid_x = {grid} :" in dkdv[0]
    assert f"num_warps = {warps} :" in dkdv[0]
