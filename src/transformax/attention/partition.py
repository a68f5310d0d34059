"""How the attention op splits over a device mesh: each device runs the kernel on its own batch
and head shard. Sequences are never split (that is context parallelism, e.g. ring attention,
which this op does not do).

- Meshes with explicit axes (shardings are part of the types): ``explicit`` runs the op under a
  ``shard_map`` over the batch/head axes of the query's sharding, so every kernel, Pallas
  included, runs on local shards. Each shard draws the dropout bits of its global (batch,
  head) positions, so the result is the one-device result.
- Automatic shardings (``jit`` over several devices, shardings found by propagation): the
  Pallas and FFI kernels are custom calls XLA cannot split (it would gather q/k/v to every
  device), so there the op runs the first eligible kernel made of plain XLA ops
  (``split_plan``), which XLA partitions over batch and heads like any other code; ``explain``
  reports the swap (``explained``). For the Pallas kernels per shard, use an explicit mesh or
  ``shard_map``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from transformax.attention import select
from transformax.attention.problem import Extras, Problem, hoist

# Kernels made of plain XLA ops: XLA's partitioner splits them without gathering.
PARTITIONABLE = (select.Backend.XLA_FLASH, select.Backend.MATH)

_DIMS = ("batch", "head", "sequence", "head_dim")


def _spec(x) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _size(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in _axes(entry))


def explicit(problem: Problem, fn, q, k, v, extras: Extras):
    """``fn(local_problem, q, k, v, extras) -> (out, lse)`` run on each device's batch/head
    shard in a ``shard_map``, returning the global ``(out, lse)``; None (nothing run) when the
    query is not sharded over explicit mesh axes."""
    mesh = jax.typeof(q).sharding.mesh
    if mesh.empty or not mesh.explicit_axes or all(e is None for e in _spec(q)):
        return None
    batch, heads, *_ = _spec(q)
    n_batch, n_heads = _size(mesh, batch), _size(mesh, heads)
    split_kv = heads is not None and problem.kv_heads > 1
    if split_kv and problem.kv_heads % n_heads:
        raise ValueError(f"sdpa: the query heads are split {n_heads} ways over {heads!r} but "
                         f"the {problem.kv_heads} key/value heads do not divide by {n_heads}")
    q_spec = (batch, heads, None, None)
    kv_spec = (batch, heads if split_kv else None, None, None)

    def rows_spec(x, heads_dim: bool):  # leading dims of size 1 stay whole
        lead = (batch if x.shape[0] > 1 else None,)
        if heads_dim:
            lead += (heads if x.shape[1] > 1 else None,)
        return lead + (None,) * (x.ndim - len(lead))

    named = [("query", q, q_spec), ("key", k, kv_spec), ("value", v, kv_spec)]
    if extras.mask is not None:
        named.append(("attn_mask", extras.mask, rows_spec(extras.mask, True)))
    named += [("attn_mask", x, rows_spec(x, False)) for x in (*extras.bounds, *extras.segments)]
    if extras.table is not None:
        named.append(("block_mask", extras.table, rows_spec(extras.table, True)))
    operands = [_resharded(*x) for x in named]
    specs = [P(*spec) for *_, spec in named]
    consts = (*extras.mask_consts, *extras.score_consts)
    operands += [*consts, *([extras.seed] if extras.seed is not None else [])]
    specs += [P()] * (len(operands) - len(specs))

    def local_rows(n, spec):
        return None if n is None else n // _size(mesh, spec[0])

    local = dataclasses.replace(
        problem, batch=problem.batch // n_batch, q_heads=problem.q_heads // n_heads,
        kv_heads=problem.kv_heads // (n_heads if split_kv else 1),
        mask_shape=None if extras.mask is None else tuple(
            d // _size(mesh, e) for d, e in zip(problem.mask_shape, named[3][2])),
        bounds=local_rows(problem.bounds, rows_spec(extras.bounds[0], False)
                          if extras.bounds else None),
        segments=local_rows(problem.segments, rows_spec(extras.segments[0], False)
                            if extras.segments else None))

    def body(*args):
        it = iter(args)
        q, k, v = next(it), next(it), next(it)
        mask = next(it) if extras.mask is not None else None
        bounds = tuple(next(it) for _ in extras.bounds)
        segments = tuple(next(it) for _ in extras.segments)
        table = next(it) if extras.table is not None else None
        mask_consts = tuple(next(it) for _ in extras.mask_consts)
        score_consts = tuple(next(it) for _ in extras.score_consts)
        seed = next(it, None)
        b0, h0 = _offsets(local, batch, heads)
        if seed is not None:  # the shard's first (batch, head) in the whole problem
            seed = jnp.stack([seed[0], seed[1], jnp.uint32(b0 * problem.q_heads + h0),
                              jnp.uint32(problem.q_heads)])
        shard, mask_consts, score_consts = _global_indices(local, mask_consts, score_consts,
                                                           b0, h0)
        return fn(shard, q, k, v, Extras(mask, seed, bounds, segments, table, mask_consts,
                                         score_consts))

    # Manual over every mesh axis (operands are replicated over the others): nothing is left
    # for XLA's partitioner to split, so the planned kernel runs as is.
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                         out_specs=(P(*q_spec), P(*q_spec[:3])))(*operands)


def _offsets(local: Problem, batch, heads):
    """Inside the shard_map: this shard's first global batch and head index."""
    b0 = jax.lax.axis_index(_axes(batch)) * local.batch if batch is not None else 0
    h0 = jax.lax.axis_index(_axes(heads)) * local.q_heads if heads is not None else 0
    return b0, h0


def _global_indices(local: Problem, mask_consts, score_consts, b0, h0):
    """Inside the shard_map: the mask_mod and score_mod re-hoisted to see global batch and head
    indices ``b0 + b``, ``h0 + h`` (the kernels count from 0 on each shard)."""
    fields = {}
    if local.mask_fn is not None:
        fn, consts = local.mask_fn, mask_consts
        fields["mask_fn"], mask_consts = hoist(
            lambda b, h, q, kv: fn(b + b0, h + h0, q, kv, *consts), fn.name, *[jnp.int32] * 4)
    if local.score_fn is not None:
        fn, consts = local.score_fn, score_consts
        fields["score_fn"], score_consts = hoist(
            lambda s, b, h, q, kv: fn(s, b + b0, h + h0, q, kv, *consts), fn.name,
            local.acc_dtype, *[jnp.int32] * 4)
    return dataclasses.replace(local, **fields), mask_consts, score_consts


def _resharded(name: str, x, spec: tuple):
    """``x`` placed as ``spec``: dims it does not split yet are split (a local slice); a dim
    split otherwise is an error, naming the context-parallel layout for sequence dims."""
    have = _spec(x)
    for dim, (got, want) in enumerate(zip(have, spec)):
        if got is None or got == want:
            continue
        hint = ("sdpa splits over batch and heads only: reshard the sequence whole, or use a "
                "context-parallel (ring attention) layout" if _DIMS[dim] == "sequence" else
                f"shard it like the query, {P(*spec)}")
        raise ValueError(f"sdpa: {name} (shape {tuple(x.shape)}) is sharded {P(*have)} on an "
                         f"explicit mesh: its {_DIMS[dim]} dim is split over {got!r}; {hint}")
    return x if have == spec else jax.sharding.reshard(x, P(*spec))


def split_plan(problem: Problem, plan) -> tuple[tuple[str, str | None, str | None], ...]:
    """``plan`` with, per platform, a third entry: the kernel to run where XLA's partitioner
    splits the op, i.e. the planned one if XLA can split it, else the first eligible
    partitionable one (None where there is none: the planned kernel runs, gathered)."""
    result = []
    for platform, name in plan:
        split = name
        if name is not None and select.Backend(name) not in PARTITIONABLE:
            split = next((v.backend.value for v in select.verdicts(problem, platform)
                          if v.eligible and v.backend in PARTITIONABLE), None)
        result.append((platform, name, split))
    return tuple(result)


def automatic_split(query) -> str | None:
    """The devices over which a ``jit`` of ``query`` (an array or ``jax.ShapeDtypeStruct``) leaves
    the op to XLA's partitioner, described (its mesh, when it has one): several devices and no
    explicit mesh axis splitting the query (that case runs per shard, see ``explicit``); None
    where the op runs on one device or per shard."""
    sharding = getattr(query, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        devices = len(getattr(sharding, "device_set", ()))
        return f"{devices} devices" if devices > 1 else None
    split = {a for e in getattr(sharding, "spec", ()) for a in _axes(e)}
    if mesh.size <= 1 or split & set(mesh.explicit_axes):
        return None
    types = ", ".join(f"{a}={t.name}" for a, t in zip(mesh.axis_names, mesh.axis_types))
    return f"the {mesh.size}-device mesh {dict(mesh.shape)} ({types})"


def explained(explanation: select.Explanation, query) -> select.Explanation:
    """``explanation`` as a ``jit`` over ``query``'s devices runs it: where XLA's partitioner
    splits the op (``automatic_split``), a custom-call kernel gives way to the partitionable one
    that runs in its place (``split_plan``), or, with none eligible, runs gathered."""
    where = automatic_split(query)
    if where is None:
        return explanation
    problem, rows = explanation.problem, list(explanation.rows)
    for platform, name, split in split_plan(problem, select.plan(problem)):
        if name == split:
            continue
        at = {v.backend.value: i for i, v in enumerate(rows) if v.platform == platform}
        planned = rows[at[name]]
        if split is None:
            rows[at[name]] = dataclasses.replace(planned, config="; ".join(filter(None, (
                planned.config, f"gathered: XLA's partitioner cannot split this custom call "
                f"over {where}, so every device runs the whole problem"))))
            continue
        rows[at[name]] = dataclasses.replace(planned, chosen=False, config=None, reasons=(
            f"a custom call XLA's partitioner cannot split: over {where} {split} runs in its "
            f"place (for {name} per shard, shard the query over an explicit mesh or use "
            f"shard_map)",))
        rows[at[split]] = dataclasses.replace(rows[at[split]], chosen=True, config="; ".join(
            filter(None, (f"in place of {name} over {where}",
                          select.config_description(select.Backend(split), problem)))))
    return dataclasses.replace(explanation, rows=tuple(rows))
