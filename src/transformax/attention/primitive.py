"""The attention primitive: one named op in jaxprs, lowered per platform to the kernel the
selector chose when the call was traced, with a batching rule and a VJP.

``plan`` (a primitive parameter) maps each platform to a kernel name, so one traced function
lowers to Pallas on cuda/tpu and to XLA on cpu, also in a multi-platform export, and to the
kernel to run where XLA's partitioner splits the op with no partitioning rule (see
``partition``: custom-call kernels get one under a ``jit`` over a mesh's devices).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
# vma typing and the lowering's device context: jax.extend has no public API for them.
from jax._src import config, core, dispatch, sharding_impls
from jax._src import mesh as mesh_lib
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from transformax import partitioning
from transformax.attention import partition, select, tile_math
from transformax.attention.backends import math as math_kernel
from transformax.attention.problem import Extras, Problem, same_varying_axes


def _primitive(name: str) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    return prim


forward_p, backward_p = _primitive("transformax_sdpa"), _primitive("transformax_sdpa_bwd")
# The same ops where a jit may leave them to XLA's partitioner over a mesh: jax lowers them with
# the device list, which a custom-call kernel's partitioning rule needs (partition.automatic).
split_forward_p = _primitive("transformax_sdpa_split")
split_backward_p = _primitive("transformax_sdpa_split_bwd")
dispatch.prim_requires_devices_during_lowering.update((split_forward_p, split_backward_p))
_PRIMITIVES = {False: (forward_p, backward_p), True: (split_forward_p, split_backward_p)}

Plan = tuple[tuple[str, "str | None", "str | None"], ...]  # platform, kernel, when split


def _split(problem: Problem, args):
    """Operands -> (q, k, v, extras, rest)."""
    q, k, v, *rest = args
    extras, rest = Extras.unflat(problem, rest)
    return q, k, v, extras, rest


def _run_forward(problem, name, *args):
    q, k, v, extras, _ = _split(problem, args)
    return select.kernel(select.Backend(name)).forward(problem, q, k, v, extras)


def _run_backward(problem, name, *args):
    q, k, v, extras, (out, lse, dout, dlse) = _split(problem, args)
    dq, dk, dv, dconsts = select.kernel(select.Backend(name)).backward(
        problem, q, k, v, extras, out, lse, dout, dlse)
    return (dq, dk, dv, *dconsts)


_RUNNERS = {forward_p: _run_forward, backward_p: _run_backward,
            split_forward_p: _run_forward, split_backward_p: _run_backward}


def current_platform() -> str:
    platform = jax.default_backend()
    return "cuda" if platform == "gpu" else platform


def _kernel_name(problem: Problem, plan: Plan, platform: str, split: bool) -> str:
    name, split_name = next(((n, s) for p, n, s in plan if p == platform), (None, None))
    name = split_name or name if split else name
    if name is None:
        raise select.no_kernel_error(problem, platform)
    return name


@functools.lru_cache(maxsize=256)
def _compiled(prim, problem: Problem, plan: Plan):
    return jax.jit(functools.partial(prim.bind, problem=problem, plan=plan))


def _impl(prim):
    def impl(*args, problem, plan):  # compiled through the lowering rules, also without jit
        with jax.disable_jit(False):
            return tuple(_compiled(prim, problem, plan)(*args))
    return impl


def _like(aval, shape, dtype, spec):
    """An aval of ``shape``/``dtype`` on ``aval``'s mesh with partition ``spec``, keeping its
    varying manual axes (so the op types check inside ``shard_map`` and on explicit meshes)."""
    return aval.update(shape=shape, dtype=dtype, weak_type=False,
                       sharding=aval.sharding.update(spec=spec))


def _forward_abstract(*args, problem, plan):
    q = args[0]
    core.standard_vma_rule(forward_p.name, *args)
    rows = (problem.batch, problem.q_heads, problem.q_len)
    spec = tuple(q.sharding.spec) + (None,) * (4 - len(q.sharding.spec))
    return (_like(q, (*rows, problem.v_head_dim), q.dtype, (*spec[:3], None)),
            _like(q, rows, problem.acc_dtype, spec[:3]))


def _backward_abstract(*args, problem, plan):
    core.standard_vma_rule(backward_p.name, *args)
    q, k, v, extras, _ = _split(problem, args)
    return tuple(x.update(weak_type=False)
                 for x in (q, k, v, *tile_math.differentiable_consts(problem, extras)))


def _split_by_partitioner(ctx) -> bool:
    """True where XLA's partitioner splits this op over several devices (automatic shardings,
    or mesh axes left automatic inside ``shard_map``)."""
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices > 1
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        return math.prod(size for axis, size in axis_context.mesh.shape.items()
                         if axis not in axis_context.manual_axes) > 1
    return False


def _partitioned_by_rule(ctx) -> bool:
    """True where a custom-call kernel gets a partitioning rule (``partition.automatic``):
    a ``jit`` over a mesh's devices leaves the op to XLA's partitioner, outside ``jax.export``
    (which cannot serialize the rule)."""
    axis_context = ctx.module_context.axis_context
    return (_split_by_partitioner(ctx) and not ctx.module_context.lowering_parameters.for_export
            and isinstance(axis_context, sharding_impls.ShardingContext)
            and axis_context.device_assignment is not None
            and axis_context.abstract_mesh is not None)


def _local(module_context):
    """``module_context`` for lowering a kernel on one device. A one-device ``jit`` lowers
    without its device list, which a ``custom_partitioning`` op inside the kernel (jax's cuDNN
    attention) asserts on: lowered as fully manual, that op is inlined."""
    axis_context = module_context.axis_context
    if (isinstance(axis_context, sharding_impls.ShardingContext)
            and axis_context.num_devices == 1 and axis_context.device_assignment is None):
        return module_context.replace(
            axis_context=sharding_impls.SPMDAxisContext(mesh_lib.empty_concrete_mesh))
    return module_context


def _plain(aval):
    return jax.core.ShapedArray(aval.shape, aval.dtype)


def _lowering(prim, platform):
    def rule(ctx, *args, problem, plan):
        by_rule = _partitioned_by_rule(ctx)
        name = _kernel_name(problem, plan, platform, _split_by_partitioner(ctx) and not by_rule)
        if ctx.module_context.lowering_parameters.for_export:  # jax.export: stable targets only
            name = select.exportable(problem, platform, name)
        run = functools.partial(_RUNNERS[prim], problem, name)
        if by_rule and select.Backend(name) not in partition.PARTITIONABLE:
            run = partition.automatic(problem, lambda p, *a: _RUNNERS[prim](p, name, *a),
                                      prim is split_backward_p, ctx.avals_in)
        # The kernel is a local computation: trace it on plain (unsharded, invariant) types.
        ctx = ctx.replace(avals_in=[_plain(a) for a in ctx.avals_in],
                          avals_out=[_plain(a) for a in ctx.avals_out],
                          module_context=_local(ctx.module_context))
        with config._check_vma(False):
            return mlir.lower_fun(run, multiple_results=True)(ctx, *args)
    return rule


for _prim, _abstract in ((forward_p, _forward_abstract), (backward_p, _backward_abstract),
                         (split_forward_p, _forward_abstract),
                         (split_backward_p, _backward_abstract)):
    _prim.def_impl(_impl(_prim))
    _prim.def_abstract_eval(_abstract)
    for _platform in select.PLATFORMS:
        mlir.register_lowering(_prim, _lowering(_prim, _platform), platform=_platform)


def _fold_batch(problem: Problem, args, dims, size):
    """Merges a vmapped axis of ``size`` into the canonical batch dimension, or None where an
    operand without a batch dimension (a block table, a captured array) is vmapped."""
    q, k, v, extras, rest = _split(problem, args)
    q_dim, k_dim, v_dim, extra_dims, rest_dims = _split(problem, dims)
    if (extra_dims.table is not None
            or any(d is not None for d in (*extra_dims.mask_consts, *extra_dims.score_consts))):
        return None

    def fold(x, dim, batch):
        x = jnp.broadcast_to(x[None], (size, *x.shape)) if dim is None else jnp.moveaxis(x, dim, 0)
        if x.shape[1] != batch:
            x = jnp.broadcast_to(x, (size, batch, *x.shape[2:]))
        return x.reshape(size * batch, *x.shape[2:])

    def fold_rows(x, dim):  # an operand whose leading dim is 1 or the batch
        return x if dim is None and x.shape[0] == 1 else fold(x, dim, problem.batch)

    folded = [fold(x, d, problem.batch) for x, d in ((q, q_dim), (k, k_dim), (v, v_dim))]
    new = dict(batch=size * problem.batch)
    mask = extras.mask
    if mask is not None:
        mask = fold_rows(mask, extra_dims.mask)
        new["mask_shape"] = tuple(mask.shape)
    bounds = tuple(fold_rows(x, d) for x, d in zip(extras.bounds, extra_dims.bounds))
    segments = tuple(fold_rows(x, d) for x, d in zip(extras.segments, extra_dims.segments))
    if bounds:
        new["bounds"] = max(x.shape[0] for x in bounds)
    if segments:
        new["segments"] = max(x.shape[0] for x in segments)
    folded += extras._replace(mask=mask, bounds=bounds, segments=segments).flat()
    folded += [fold(x, d, problem.batch) for x, d in zip(rest, rest_dims)]
    return dataclasses.replace(problem, **new), folded


def _batching(prim):
    def rule(args, dims, *, problem, plan):
        size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
        folded = None if problem.has_dropout else _fold_batch(problem, args, dims, size)
        if folded is None:
            # Sequential: each example keeps the dropout stream it has when called alone.
            moved = [x if d is None else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims)]
            batched = [d is not None for d in dims]

            def one(xs):
                it = iter(xs)
                full = [next(it) if b else x for x, b in zip(moved, batched)]
                return tuple(prim.bind(*full, problem=problem, plan=plan))

            outs = jax.lax.map(one, [x for x, b in zip(moved, batched) if b])
            return outs, (0,) * len(outs)
        new_problem, folded = folded
        outs = prim.bind(*folded, problem=new_problem, plan=plan)
        outs = [o.reshape(size, problem.batch, *o.shape[1:]) for o in outs]
        return outs, (0,) * len(outs)
    return rule


for _prim in _RUNNERS:
    batching.primitive_batchers[_prim] = _batching(_prim)


def attention(problem: Problem, plan, q, k, v, extras: Extras):
    """Canonical attention: ``(out, lse)`` computed by the planned kernel of each platform.

    On a mesh with explicit axes it runs on each device's batch/head shard
    (``partition.explicit``); where a ``jit`` leaves the op to XLA's partitioner, per shard by
    the kernel's partitioning rule (``partition.automatic``). Inside ``shard_map`` the operands
    are first made to vary over the same manual axes (autodiff sums their cotangents back)."""
    local = functools.partial(_local_attention, partition.split_plan(problem, plan))
    sharded = partition.explicit(problem, local, q, k, v, extras)
    if sharded is not None:
        return sharded
    return local(problem, q, k, v, extras, split=partitioning.left_to_partitioner(q, k, v))


def _local_attention(plan: Plan, problem: Problem, q, k, v, extras: Extras, split=False):
    q, k, v, *flat = same_varying_axes(q, k, v, *extras.flat())
    return _attention(problem, plan, split, q, k, v, Extras.unflat(problem, flat)[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(problem: Problem, plan: Plan, split: bool, q, k, v, extras: Extras):
    return tuple(_PRIMITIVES[split][0].bind(q, k, v, *extras.flat(), problem=problem, plan=plan))


def _attention_fwd(problem, plan, split, q, k, v, extras):
    out, lse = _attention(problem, plan, split, q, k, v, extras)
    return (out, lse), (q, k, v, extras, out, lse)


def _attention_bwd(problem, plan, split, residuals, cotangents):
    q, k, v, extras, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv, *dconsts = _PRIMITIVES[split][1].bind(
        q, k, v, *extras.flat(), out, lse, dout, dlse, problem=problem, plan=plan)
    dmask = None
    if extras.mask is not None and not problem.mask_is_bool:
        dmask = math_kernel.mask_gradient(problem, q, k, v, extras, dout, dlse)
    none = lambda xs: tuple(None for _ in xs)
    dscore = tile_math.with_differentiable(problem, none(extras.score_consts), dconsts)
    dextras = Extras(dmask, None, none(extras.bounds), none(extras.segments), None,
                     none(extras.mask_consts), dscore)
    return dq, dk, dv, dextras


_attention.defvjp(_attention_fwd, _attention_bwd)
