"""The attention primitive: one named op, jit/non-jit parity, vmap, lowering, sharding."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx
from transformax.attention import api, partition, primitive, select
from transformax.attention.problem import Problem
from transformax.attention.backends import pallas_common
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

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


def test_cpu_lowering_is_the_native_kernel_or_plain_xla():
    attend = lambda q, k, v: tfx.sdpa(q, k, v, is_causal=True)  # noqa: E731
    assert "tfx_cpu_flash_fwd" in jax.jit(attend).lower(Q, K, V).as_text()
    with tfx.sdpa_kernel(tfx.Backend.XLA_FLASH):
        text = jax.jit(attend).lower(Q, K, V).as_text()
    assert "custom_call" not in text and "dot_general" in text


def test_float_mask_gradient_matches_math():
    mask = jnp.asarray(rng.standard_normal((3, 24, 1)), jnp.float32)
    grads = {}
    for backend in (tfx.Backend.MATH, tfx.Backend.XLA_FLASH):
        with tfx.sdpa_kernel(backend):
            grads[backend] = jax.jit(jax.grad(
                lambda m: jnp.sum(tfx.sdpa(Q, K, V, attn_mask=m) ** 2)))(mask)
    assert grads[tfx.Backend.MATH].shape == mask.shape
    np.testing.assert_allclose(*grads.values(), atol=1e-5)


@pytest.mark.parametrize("backend", [
    tfx.Backend.XLA_FLASH, tfx.Backend.CPU_FLASH,
    *(pytest.param(b, marks=pytest.mark.slow)  # interpret mode: ~2 s each
      for b in (tfx.Backend.PALLAS_TPU, tfx.Backend.PALLAS_TRITON))])
def test_shard_seed_draws_the_dropout_bits_of_global_positions(backend, monkeypatch):
    """A shard's ``uint32[4]`` seed (its first global batch·Hq + head, and Hq) makes a kernel run
    on batch 0..1 and heads 1..2 of 3 reproduce those rows of the whole problem, forward and
    backward (what ``partition.explicit`` passes each shard)."""
    monkeypatch.setenv(pallas_common.INTERPRET_ENV, "1")
    call = api._Call(Q, K, V, None, 0.4, False, None, False, jax.random.key(5))
    kernel = select.kernel(backend)
    whole, extras = call.problem, call.extras
    local = dataclasses.replace(whole, q_heads=2, kv_heads=2)
    seed = jnp.concatenate([extras.seed, jnp.array([1, 3], jnp.uint32)])

    @functools.partial(jax.jit, static_argnums=0)
    def run(p, q, k, v, e):
        out, lse = kernel.forward(p, q, k, v, e)
        return (out, *kernel.backward(p, q, k, v, e, out, lse, jnp.cos(q), 0 * lse)[:3])

    results = [run(whole, Q, K, V, extras),
               run(local, Q[:, 1:], K[:, 1:], V[:, 1:], extras._replace(seed=seed))]
    for a, b in zip(*results):
        np.testing.assert_allclose(a[:, 1:], b, atol=1e-5, rtol=1e-5)
    assert not np.allclose(results[0][0][:, :2], results[1][0])  # other heads: other bits


def _mesh(axis_type):
    """A one-device mesh: sharding and vma types are the same as on many devices."""
    return jax.make_mesh((1, 1), ("data", "tensor"), axis_types=(axis_type,) * 2)


GQA_MASK = jnp.asarray(rng.standard_normal((2, 1, 24, 24)), jnp.float32)


def gqa_loss(q, k, v, mask=GQA_MASK):
    out = tfx.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    return jnp.sum(out * out)


GQA_GRAD = jax.jit(jax.value_and_grad(gqa_loss, argnums=(0, 1, 2)))
Q4 = jnp.concatenate([Q, Q * 0.5], axis=1)[:, :4]  # 4 query heads on 2 key/value heads


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_shard_map_with_default_checks(axis_type):
    """Forward and gradient inside ``shard_map`` (check_vma on), with the key/value and the
    mask replicated (not varying) while the query varies; and ``vmap`` inside it."""
    mesh = _mesh(axis_type)
    k, v = K[:, :2], V[:, :2]
    want = GQA_GRAD(Q4, k, v)
    with jax.set_mesh(mesh):
        q = jax.device_put(Q4, P("data", "tensor"))
        sharded = jax.shard_map(lambda *a: jax.lax.psum(gqa_loss(*a), ("data", "tensor")),
                                in_specs=(P("data", "tensor"), P(), P(), P()), out_specs=P())
        got = jax.jit(jax.value_and_grad(lambda *a: sharded(*a, GQA_MASK), argnums=(0, 1, 2)))(
            q, k, v)
        batched = jax.jit(jax.shard_map(
            jax.vmap(lambda q: tfx.sdpa(q, k, v, enable_gqa=True)),
            in_specs=P(None, "data", "tensor"), out_specs=P(None, "data", "tensor")))(
                jnp.stack([q, q]))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(batched[1], tfx.sdpa(Q4, k, v, enable_gqa=True), atol=1e-6)


def test_explicit_mesh_keeps_shardings_jit_and_no_jit():
    k, v = K[:, :2], V[:, :2]
    want = GQA_GRAD(Q4, k, v)
    with jax.set_mesh(_mesh(AxisType.Explicit)):
        q, k, v = (jax.device_put(x, P("data", "tensor")) for x in (Q4, k, v))
        out = jax.jit(lambda q: tfx.sdpa(q, k, v, enable_gqa=True))(q)
        assert jax.typeof(out).sharding.spec == P("data", "tensor", None, None)
        f = jax.value_and_grad(gqa_loss, argnums=(0, 1, 2))
        jitted = jax.jit(f)(q, k, v)
        with jax.disable_jit():
            eager = f(q, k, v)
        batched = jax.jit(jax.vmap(lambda q: tfx.sdpa(q, k, v, enable_gqa=True)))(q[None])
    assert [jax.typeof(g).sharding.spec for g in jitted[1]] == [P("data", "tensor", None, None)] * 3
    for got in (jitted, eager):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(batched[0], out, atol=1e-6)


@pytest.mark.parametrize("q_spec, k_spec, message", [
    (P("data"), P("tensor"),
     "sdpa: key (shape (2, 3, 24, 8)) is sharded P('tensor', None, None, None) on an explicit "
     "mesh: its batch dim is split over 'tensor'; shard it like the query, "
     "P('data', None, None, None)"),
    (P(None, None, "data"), P(),
     "sdpa: query (shape (2, 3, 24, 8)) is sharded P(None, None, 'data', None) on an "
     "explicit mesh: its sequence dim is split over 'data'; sdpa splits over batch and heads "
     "only: reshard the sequence whole, or use a context-parallel (ring attention) layout"),
])
def test_explicit_sharding_errors(q_spec, k_spec, message):
    with jax.set_mesh(_mesh(AxisType.Explicit)):
        q, k = jax.device_put(Q, q_spec), jax.device_put(K, k_spec)
        with pytest.raises(ValueError) as err:
            tfx.sdpa(q, k, V)
    assert str(err.value) == message


CPU = jax.sharding.AbstractDevice(device_kind="cpu", num_cores=None, platform="cpu")


def _on_mesh(axis_type, spec, shape=(2, 4), device=CPU, array=Q):
    """``array``'s shape on an abstract mesh, of this process's kind of devices by default (as
    a jit over a concrete mesh sees it) or of none (``device=None``)."""
    mesh = jax.sharding.AbstractMesh(shape, ("data", "tensor")[:len(shape)],
                                     (axis_type,) * len(shape), abstract_device=device)
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=NamedSharding(mesh, spec))


MESH = "the 8-device mesh {'data': 2, 'tensor': 4}"
PLANNED = (("cpu", "cpu_flash"), ("cuda", "pallas_triton"), ("tpu", "pallas_tpu"))
Q8, K4 = jnp.zeros((4, 8, 40, 16)), jnp.zeros((4, 4, 48, 16))  # shapes only


@pytest.mark.parametrize("axis_type, spec, q, k, shard, gathered", [
    (AxisType.Auto, P("data", "tensor"), Q8, K4, (2, 2, 40, 16), ""),
    (AxisType.Explicit, P(), Q8, K4, (4, 8, 40, 16), ""),
    # 2 key/value heads: each shard's 2 query heads read one (sliced).
    (AxisType.Auto, P(None, "tensor", "data"), Q8, K4[:, :2], (4, 2, 40, 16),
     "; the sequence dim split over 'data' is gathered first (sdpa splits over batch and heads "
     "only: for a split sequence use a context-parallel layout)"),
    (AxisType.Auto, P("data", "tensor"), jnp.zeros((4, 12, 40, 16)), K4[:, :3], (2, 12, 40, 16),
     "; the head dim split over 'tensor' is gathered first (the query heads are split 4 ways "
     "over 'tensor' but the 3 key/value heads do not divide by 4, nor do a shard's 3 query "
     "heads divide the 4 that read each key/value head)"),
])
def test_explain_reports_each_kernel_per_shard_where_xla_splits_the_op(axis_type, spec, q, k,
                                                                       shard, gathered):
    """Several devices and no explicit axis splitting the query: every planned kernel runs per
    shard (custom calls by their partitioning rule), and the report says on which query shard
    and what the partitioner gathers first."""
    q = _on_mesh(axis_type, spec, array=q)
    report = tfx.explain(q, k, k, is_causal=True, enable_gqa=True)
    types = f"(data={axis_type.name}, tensor={axis_type.name})"
    for platform, planned in PLANNED:
        assert report.chosen(platform) == tfx.Backend(planned)
        row = next(v for v in report.rows if v.platform == platform and v.chosen)
        assert row.config.startswith(f"per shard over {MESH} {types}: each device runs its "
                                     f"{shard} query shard{gathered}"), row.config


def test_explain_reports_the_kernel_in_place_of_a_custom_call_without_devices():
    """A mesh of no devices (abstract, e.g. to export for other hardware): jax lowers no
    partitioning rule there, so a plain-XLA kernel runs in place of each custom call; with none
    allowed the planned kernel runs gathered. One device, or an explicit mesh splitting the
    query (per shard): the planned kernels."""
    q = _on_mesh(AxisType.Auto, P("data", "tensor"), device=None)
    report = tfx.explain(q, q, q, is_causal=True)
    for platform, planned in PLANNED:
        assert report.chosen(platform) == tfx.Backend.XLA_FLASH
        rows = {v.backend.value: v for v in report.rows if v.platform == platform}
        assert rows[planned].reasons == (
            f"with no mesh of this process's devices, a custom call has no partitioning rule: "
            f"over {MESH} (data=Auto, tensor=Auto) xla_flash runs in its place (for {planned} "
            f"per shard, shard the query over a jax.make_mesh mesh)",)
        assert rows["xla_flash"].config.startswith(f"in place of {planned} over {MESH}")
    with tfx.sdpa_kernel(tfx.Backend.PALLAS_TRITON):
        report = tfx.explain(q, q, q)
    assert report.chosen("cuda") == tfx.Backend.PALLAS_TRITON
    assert str(report).count(f"gathered: with no mesh of this process's devices, this custom "
                             f"call has no partitioning rule over {MESH}") == 1
    for q in (_on_mesh(AxisType.Auto, P("data"), (1,)), _on_mesh(AxisType.Explicit, P("data"))):
        report = tfx.explain(q, q, q, is_causal=True)
        assert str(report) == str(tfx.explain(Q, K, V, is_causal=True))


def test_lowering_for_an_abstract_mesh_alone():
    """No devices to lower a partitioning rule with: the op lowers with plain-XLA kernels."""
    q = _on_mesh(AxisType.Auto, P("data", "tensor"), device=None, array=Q8)
    text = jax.jit(lambda q: tfx.sdpa(q, q, q)).trace(q).lower(
        lowering_platforms=("cpu",)).as_text()
    assert "CustomSPMDPartitioning" not in text and "tfx_cpu_flash" not in text


H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                   platform="cuda")


@pytest.mark.parametrize("platform, kernel, call", [
    ("cuda", "pallas_triton", "__gpu$xla.gpu.triton"), ("tpu", "pallas_tpu", "tpu_custom_call")])
def test_partitioning_rule_runs_the_kernel_per_shard_lowered_for_gpu_and_tpu(platform, kernel,
                                                                             call):
    """What XLA's partitioner compiles on each device under automatic shardings, lowered for
    cuda/tpu without one (jax lowers the rule inside a jit only with devices, so its per-shard
    computation is lowered here in a shard_map, untyped as there): with the query's batch over
    ``data`` and heads over ``tensor``, the forward and backward kernels take one device's
    (1, 1, 256, 64) shard of the (2, 4, 256, 64) operands, and nothing gathers them."""
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "tensor"), (AxisType.Auto,) * 2,
                                     abstract_device=H100 if platform == "cuda" else None)
    problem = Problem(batch=2, q_heads=4, kv_heads=4, q_len=256, kv_len=256, head_dim=64,
                      v_head_dim=64, dtype=np.dtype(jnp.bfloat16), scale=0.125, causal_offset=0)
    split = NamedSharding(mesh, P("data", "tensor"))
    x = jax.ShapeDtypeStruct((2, 4, 256, 64), jnp.bfloat16, sharding=split)
    lse = jax.ShapeDtypeStruct((2, 4, 256), jnp.float32, sharding=split)
    modules = []
    for backward, args, results in ((False, [x] * 3, (x, lse)),
                                    (True, [x] * 3 + [x, lse, x, lse], (x,) * 3)):
        run = primitive._RUNNERS[primitive._PRIMITIVES[True][backward]]
        op = partition.automatic(problem, lambda p, *a: run(p, kernel, *a), backward, args)
        _, lower, outs, ins = op.partition(mesh, args, results)
        body = jax.shard_map(lower, mesh=mesh, in_specs=tuple(s.spec for s in ins),
                             out_specs=tuple(s.spec for s in outs), check_vma=False)
        with jax.sharding.use_abstract_mesh(mesh):
            modules.append(jax.jit(body).trace(*args).lower(
                lowering_platforms=(platform,)).as_text())
    for module, n in zip(modules, (1, 2)):
        calls = [line for line in module.splitlines() if f"custom_call @{call}" in line]
        assert len(calls) == n, calls
        local, whole = "tensor<1x1x256x64xbf16>", "tensor<2x4x256x64xbf16>"
        assert all(local in line and whole not in line for line in calls), calls
        assert "all_gather" not in module and "all_to_all" not in module


EIGHT_DEVICES = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import transformax as tfx
    from transformax.attention.backends import pallas_common
    spec = P("data", "tensor")
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (4, 8, 40, 16))
    k, v = (jax.random.normal(key, (4, 4, 48, 16)) for key in keys[1:3])
    mask = jax.random.normal(keys[3], (4, 1, 40, 48))

    def loss(q, k, v, mask):
        out = tfx.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
        return jnp.sum(out * out)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    with tfx.sdpa_kernel(tfx.Backend.MATH):
        want = jax.jit(grad)(q, k, v, mask)

    def check(compiled, *args):
        text = compiled.as_text()
        assert "all-gather" not in text and "all-to-all" not in text, text
        for a, b in zip(jax.tree.leaves(compiled(*args)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)

    explicit = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(explicit):
        try:
            tfx.sdpa(jax.device_put(jnp.zeros((4, 12, 40, 16)), spec), k[:, :3], v[:, :3],
                     enable_gqa=True)
            raise AssertionError("12 query heads on 3 key/value heads split 4 ways")
        except ValueError as err:
            assert str(err) == ("sdpa: the query heads are split 4 ways over 'tensor' but the 3 "
                                "key/value heads do not divide by 4, nor do a shard's 3 query "
                                "heads divide the 4 that read each key/value head"), err
    for backend in (tfx.Backend.XLA_FLASH, tfx.Backend.PALLAS_TRITON, tfx.Backend.PALLAS_TPU):
        with jax.set_mesh(explicit), tfx.sdpa_kernel(backend):
            args = [jax.device_put(x, s) for x, s in
                    ((q, spec), (k, spec), (v, spec), (mask, P("data")))]
            compiled = jax.jit(grad).lower(*args).compile()
            check(compiled, *args)
            assert compiled.output_shardings[1][0].spec[:2] == ("data", "tensor")

    # Dropout per shard draws the bits of its global (batch, head) positions: the sharded result
    # and gradients are the one-device ones, for the native kernel and a Pallas one.
    def dropped(q, k, v):
        out = tfx.sdpa(q, k, v, dropout_p=0.3, dropout_rng=jax.random.key(7), enable_gqa=True)
        return jnp.sum(jnp.sin(out))

    dropped_grad = jax.jit(jax.value_and_grad(dropped, argnums=(0, 1, 2)))
    want_dropped = dropped_grad(q, k, v)
    for backend in (tfx.Backend.CPU_FLASH, tfx.Backend.PALLAS_TRITON):
        with jax.set_mesh(explicit), tfx.sdpa_kernel(backend):
            got = dropped_grad(*(jax.device_put(x, spec) for x in (q, k, v)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_dropped)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)
    # Automatic shardings: each custom-call kernel runs on the device's own query shard and
    # (2, 1, 48, 16) key/value shard by its partitioning rule, forward and backward: cpu_flash's
    # FFI calls, the Pallas kernel's loops (interpret mode).
    auto = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    args = [jax.device_put(x, NamedSharding(auto, s)) for x, s in
            ((q, spec), (k, spec), (v, spec), (mask, P("data")))]

    def kernel_shapes(text, marker):  # array shapes in the HLO of marker's calls and loops
        lines = [line.split(" metadata=")[0] for line in text.splitlines() if marker in line]
        assert lines, marker
        return {shape for line in lines for shape in re.findall(r"f32.[0-9,]+.", line)}

    local = {"f32[2,2,40,16]", "f32[2,1,48,16]"}
    for kernels, marker in ((list(tfx.Backend), 'custom_call_target="tfx_cpu_flash_'),
                            ([tfx.Backend.PALLAS_TRITON], " while(")):
        with tfx.sdpa_kernel(kernels):
            compiled = jax.jit(grad).lower(*args).compile()
        check(compiled, *args)
        shapes = kernel_shapes(compiled.as_text(), marker)
        assert local <= shapes and not shapes & {"f32[4,8,40,16]", "f32[4,4,48,16]"}, shapes
    # The Pallas kernels' loops run in the per-shard computation of the partitioning rule.
    assert all(re.search(f"tmp_xla_computation/[^ ]*transformax_flash_{name}/", compiled.as_text())
               for name in ("fwd", "dq", "dkdv"))
    # Dropout: the one-device result, also where XLA's partitioner splits the op.
    for kernels, marker in ((list(tfx.Backend), "tfx_cpu_flash_"),
                            ([tfx.Backend.PALLAS_TRITON], " while(")):
        with tfx.sdpa_kernel(kernels):
            compiled = dropped_grad.lower(*args[:3]).compile()
        assert local <= kernel_shapes(compiled.as_text(), marker)
        for a, b in zip(jax.tree.leaves(compiled(*args[:3])), jax.tree.leaves(want_dropped)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)
    # 2 key/value heads on 4 head shards: each shard's 2 query heads read one, sliced from the
    # whole key/value (their gradients summed over the head shards), on either mesh.
    with tfx.sdpa_kernel(tfx.Backend.MATH):
        want_gqa = jax.jit(grad)(q, k[:, :2], v[:, :2], mask)
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            sliced = [jax.device_put(x, s) for x, s in ((q, spec), (k[:, :2], P("data")),
                                                         (v[:, :2], P("data")), (mask, P("data")))]
            compiled = jax.jit(grad).lower(*sliced).compile()
        shapes = kernel_shapes(compiled.as_text(), "tfx_cpu_flash_")
        assert {"f32[2,2,40,16]", "f32[2,1,48,16]"} <= shapes and "f32[2,2,48,16]" not in shapes
        assert "all-gather" not in compiled.as_text()
        for a, b in zip(jax.tree.leaves(compiled(*sliced)), jax.tree.leaves(want_gqa)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)
    # Eager, and vmap (dropout: each member's own stream) inside the jit: per shard too.
    np.testing.assert_allclose(tfx.sdpa(*args[:3], enable_gqa=True),
                               tfx.sdpa(q, k, v, enable_gqa=True), atol=1e-5, rtol=1e-5)
    stacked = [jnp.stack([x, -x]) for x in (q, k, v)]
    vmapped = jax.jit(jax.vmap(lambda q, k, v: tfx.sdpa(
        q, k, v, dropout_p=0.2, dropout_rng=jax.random.key(1), enable_gqa=True)))
    want = vmapped(*stacked)
    stacked = [jax.device_put(x, NamedSharding(auto, P(None, *spec))) for x in stacked]
    compiled = vmapped.lower(*stacked).compile()
    assert "all-gather" not in compiled.as_text() and local <= kernel_shapes(
        compiled.as_text(), "tfx_cpu_flash_fwd")
    np.testing.assert_allclose(compiled(*stacked), want, atol=1e-5, rtol=1e-5)
    # explain names the kernel that runs and the query shard it runs on: per shard of an
    # explicit mesh splitting the query; by the partitioning rule where XLA splits the op (a split
    # sequence gathered first). jax.export (no rule can be serialized): a plain-XLA kernel.
    attend = jax.jit(lambda x: tfx.sdpa(x, x, x, is_causal=True))
    want = attend(q)
    with jax.set_mesh(explicit):
        cases = [jax.device_put(q, spec), jax.device_put(q, P())]
    cases += [args[0], jax.device_put(q, NamedSharding(auto, P(None, None, "data")))]
    for x, shard in zip(cases, ("[2,2,40,16]", "[4,8,40,16]", "[2,2,40,16]", "[4,8,40,16]")):
        with jax.set_mesh(x.sharding.mesh):
            compiled = attend.lower(x).compile()
            report = tfx.explain(x, x, x, is_causal=True)
        assert f"f32{shard}" in kernel_shapes(compiled.as_text(), "tfx_cpu_flash_fwd")
        assert report.chosen("cpu") == tfx.Backend.CPU_FLASH
        note = next(v.config for v in report.rows if v.chosen and v.platform == "cpu")
        assert x is cases[0] or f"its ({shard[1:-1].replace(',', ', ')}) query shard" in note
        np.testing.assert_allclose(compiled(x), want, atol=1e-5, rtol=1e-5)
    assert "gathered" in note and "tfx_cpu_flash" not in jax.export.export(attend)(
        args[0]).mlir_module()
    # flex_attention on either mesh: a score_mod reading a captured per-head array at the
    # global head, a documents mask_mod; values and gradients (the captured array's too).
    slopes = jax.random.normal(keys[3], (8,))
    docs = jnp.arange(48) // 20

    def flex_loss(q, k, v, slopes):
        block_mask = tfx.create_block_mask(lambda b, h, i, j: docs[i] == docs[j], None, None,
                                           40, 48, BLOCK_SIZE=16)
        out = tfx.flex_attention(q, k, v, lambda s, b, h, i, j: s + slopes[h] * (i - j) / 8,
                                 block_mask, enable_gqa=True)
        return jnp.sum(out * out)

    flex_grad = jax.jit(jax.value_and_grad(flex_loss, argnums=(0, 1, 2, 3)))
    want_flex = flex_grad(q, k, v, slopes)
    for mesh in (explicit, auto):
        with jax.set_mesh(mesh):
            got = flex_grad(*(jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)),
                            slopes)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_flex)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)
    print("ok")
""")


def test_eight_devices_run_each_shard_locally():
    """8 emulated devices, batch over ``data`` and heads over ``tensor`` (GQA, a float mask):
    the XLA kernel and both Pallas kernels (interpret mode) on an explicit mesh, and under
    automatic shardings cpu_flash's FFI calls and the Pallas kernels' loops on each device's
    shapes, forward and gradients against ``math``, with no gathering; dropout on either mesh
    equal to one device's; eager and vmapped calls; ``explain`` naming the kernel that runs and
    the shard the HLO shows."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", **{pallas_common.INTERPRET_ENV: "1"})
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
