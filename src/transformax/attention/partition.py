"""How the attention op splits over a device mesh: each device runs the kernel on its own batch
and head shard. Sequences are never split (that is context parallelism, e.g. ring attention,
which this op does not do).

- Meshes with explicit axes (shardings are part of the types): ``explicit`` runs the op under a
  ``shard_map`` over the batch/head axes of the query's sharding.
- Automatic shardings (``jit`` over a mesh's devices, shardings found by propagation): kernels
  made of plain XLA ops are split by XLA's partitioner like any other code; the custom-call
  kernels (Pallas, FFI) are opaque to it, so ``automatic`` gives them a partitioning rule
  (``custom_partitioning`` with a Shardy sharding rule): the partitioner splits batch and
  heads as the operands come, gathers a split sequence, and the kernel runs on each device's
  shard. Where no rule applies (``jax.export``, which cannot serialize one; shardings with no
  mesh; mesh axes left automatic inside ``shard_map``) the first eligible plain-XLA kernel
  runs in their place (``split_plan``); ``explain`` reports either (``explained``).

Either way each shard draws the dropout bits of its global (batch, head) positions and sees
global indices in mask_mod / score_mod, so the result is the one-device result.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule
from jax.sharding import NamedSharding, PartitionSpec as P

from transformax import partitioning
from transformax.partitioning import axes as _axes, size as _size
from transformax.attention import select, tile_math
from transformax.attention.problem import Extras, Problem, hoist

# Kernels made of plain XLA ops: XLA's partitioner splits them without gathering.
PARTITIONABLE = (select.Backend.XLA_FLASH, select.Backend.MATH)

_DIMS = ("batch", "head", "sequence", "head_dim")


def _spec(x) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


class _Split(NamedTuple):
    """The mesh axes splitting the batch and the query heads (None: whole), and whether the
    key/value heads split with the query's or, where they do not divide that way, are held
    whole and sliced to the one each shard's query heads read (else every shard reads them
    all: one key/value head)."""

    mesh: object
    batch: object
    heads: object
    split_kv: bool
    slice_kv: bool

    @classmethod
    def of(cls, problem: Problem, mesh, batch, heads) -> "_Split":
        gqa = heads is not None and problem.kv_heads > 1
        split = gqa and not problem.kv_heads % _size(mesh, heads)
        return cls(mesh, batch, heads, split, gqa and not split)

    @property
    def axes(self) -> tuple[str, ...]:
        return _axes(self.batch) + _axes(self.heads)

    def specs(self, problem: Problem, args) -> list[tuple]:
        """The partition of each operand of ``args`` (``q, k, v, *extras, *rest``, arrays or
        shapes): q/k/v and the rest (out, lse, their cotangents) split as the query, a mask's
        or mask array's leading dims of size > 1 likewise, the seed and captured arrays
        whole."""
        q, k, v, extras, rest = _unflat(problem, args)
        q_spec = (self.batch, self.heads, None, None)
        kv_spec = (self.batch, self.heads if self.split_kv else None, None, None)

        def rows(x, heads_dim: bool):  # leading dims of size 1 stay whole
            lead = (self.batch if x.shape[0] > 1 else None,)
            if heads_dim:
                lead += (self.heads if x.shape[1] > 1 else None,)
            return lead + (None,) * (len(x.shape) - len(lead))

        whole = lambda x: (None,) * len(x.shape)
        specs = Extras(
            None if extras.mask is None else rows(extras.mask, True),
            None if extras.seed is None else whole(extras.seed),
            tuple(rows(x, False) for x in extras.bounds),
            tuple(rows(x, False) for x in extras.segments),
            None if extras.table is None else rows(extras.table, True),
            tuple(map(whole, extras.mask_consts)), tuple(map(whole, extras.score_consts)))
        return [q_spec, kv_spec, kv_spec, *specs.flat(), *(q_spec[:len(x.shape)] for x in rest)]

    def local(self, problem: Problem, specs: list[tuple]) -> Problem:
        """``problem`` as one shard sees it (``specs`` from ``specs``)."""
        n_batch, n_heads = _size(self.mesh, self.batch), _size(self.mesh, self.heads)
        _, _, _, spec, _ = _unflat(problem, specs)
        rows = lambda n, s: None if n is None else n // _size(self.mesh, s[0][0])
        return dataclasses.replace(
            problem, batch=problem.batch // n_batch, q_heads=problem.q_heads // n_heads,
            kv_heads=1 if self.slice_kv else problem.kv_heads // (
                n_heads if self.split_kv else 1),
            mask_shape=None if spec.mask is None else tuple(
                d // _size(self.mesh, e) for d, e in zip(problem.mask_shape, spec.mask)),
            bounds=rows(problem.bounds, spec.bounds), segments=rows(problem.segments,
                                                                    spec.segments))

    def per_shard(self, problem: Problem, local: Problem, fn):
        """``fn(shard_problem, q, k, v, extras, *rest)`` as a function of the flat local
        operands, run where the mesh axes are manual: the dropout seed becomes the shard's
        ``uint32[4]`` (its first global batch·Hq + head, and Hq) and mask_mod / score_mod see
        global batch and head indices."""
        def body(*args):
            q, k, v, extras, rest = _unflat(local, args)
            b0 = jax.lax.axis_index(_axes(self.batch)) * local.batch if self.batch else 0
            h0 = self.first_head(local)
            if self.slice_kv:
                k, v = (jax.lax.dynamic_slice_in_dim(x, h0 // problem.groups, 1, axis=1)
                        for x in (k, v))
            seed = extras.seed
            if seed is not None:
                seed = jnp.stack([seed[0], seed[1], jnp.uint32(b0 * problem.q_heads + h0),
                                  jnp.uint32(problem.q_heads)])
            shard, mask_consts, score_consts = _global_indices(
                local, extras.mask_consts, extras.score_consts, b0, h0)
            extras = extras._replace(seed=seed, mask_consts=mask_consts,
                                     score_consts=score_consts)
            return fn(shard, q, k, v, extras, *rest)
        return body

    def first_head(self, local: Problem):
        """Inside a shard: its first global query head."""
        return jax.lax.axis_index(_axes(self.heads)) * local.q_heads if self.heads else 0


def _unflat(problem: Problem, args):
    q, k, v, *flat = args
    extras, rest = Extras.unflat(problem, flat)
    return q, k, v, extras, rest


def head_split_error(problem: Problem, n_heads: int, heads) -> str | None:
    """Why the query heads cannot split ``n_heads`` ways over ``heads``, or None. With GQA the
    key/value heads split with them, or each shard's query heads read one key/value head."""
    local = problem.q_heads // n_heads
    if problem.kv_heads > 1 and problem.kv_heads % n_heads and problem.groups % local:
        return (f"the query heads are split {n_heads} ways over {heads!r} but the "
                f"{problem.kv_heads} key/value heads do not divide by {n_heads}, nor do a "
                f"shard's {local} query heads divide the {problem.groups} that read each "
                f"key/value head")
    return None


def explicit(problem: Problem, fn, q, k, v, extras: Extras):
    """``fn(local_problem, q, k, v, extras) -> (out, lse)`` run on each device's batch/head
    shard in a ``shard_map``, returning the global ``(out, lse)``; None (nothing run) when the
    query is not sharded over explicit mesh axes."""
    mesh = jax.typeof(q).sharding.mesh
    if mesh.empty or not mesh.explicit_axes or all(e is None for e in _spec(q)):
        return None
    batch, heads, *_ = _spec(q)
    if error := head_split_error(problem, _size(mesh, heads), heads):
        raise ValueError(f"sdpa: {error}")
    split = _Split.of(problem, mesh, batch, heads)
    operands = [q, k, v, *extras.flat()]
    specs = split.specs(problem, operands)
    names = _names(problem, extras)
    operands = [_resharded(name, x, spec) if name else x
                for name, x, spec in zip(names, operands, specs)]
    # Manual over every mesh axis (operands are replicated over the others): nothing is left
    # for XLA's partitioner to split, so the planned kernel runs as is.
    body = split.per_shard(problem, split.local(problem, specs), fn)
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(P(*s) for s in specs),
                         out_specs=(P(*specs[0]), P(*specs[0][:3])))(*operands)


def _names(problem: Problem, extras: Extras) -> list[str | None]:
    """The argument each operand of ``q, k, v, *extras`` comes from, for errors; None for
    those passed whole (the seed, captured arrays)."""
    return ["query", "key", "value", *Extras(
        None if extras.mask is None else "attn_mask", None if extras.seed is None else "",
        ("attn_mask",) * len(extras.bounds), ("attn_mask",) * len(extras.segments),
        None if extras.table is None else "block_mask", ("",) * len(extras.mask_consts),
        ("",) * len(extras.score_consts)).flat()]


def _global_indices(local: Problem, mask_consts, score_consts, b0, h0):
    """Inside a shard: the mask_mod and score_mod re-hoisted to see global batch and head
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


def _automatic_split(problem: Problem, mesh, spec: tuple) -> _Split:
    """How a shard of the op splits where the partitioner splits the query as ``spec`` (mesh
    axes per dim): its batch and head axes where they divide the problem (with GQA, see
    ``head_split_error``), else whole (the partitioner gathers them, and any split
    sequence)."""
    batch, heads = spec[:2]
    if problem.batch % _size(mesh, batch):
        batch = None
    if problem.q_heads % _size(mesh, heads) or head_split_error(
            problem, _size(mesh, heads), heads):
        heads = None
    return _Split.of(problem, mesh, batch, heads)


def automatic(problem: Problem, run, backward: bool, avals):
    """``run(problem, *operands)`` (a custom-call kernel's forward, ``(out, lse)``, or backward,
    ``(dq, dk, dv, *dconsts)``) with a partitioning rule: under a ``jit`` that leaves the op to
    XLA's partitioner it runs on each device's batch/head shard (``_automatic_split``), the
    backward's captured-array gradients summed over the shards. ``avals``: the operands'."""
    op = partitioning.whole_problem(lambda *args: tuple(run(problem, *args)))

    def partition(mesh, arg_shapes, result_shapes):
        split = _automatic_split(problem, mesh, partitioning.spec(mesh, arg_shapes[0]))
        specs = split.specs(problem, arg_shapes)
        local = split.local(problem, specs)
        body = split.per_shard(problem, local,
                               lambda p, q, k, v, extras, *rest: tuple(
                                   run(p, q, k, v, *extras.flat(), *rest)))
        q_spec, kv_spec = specs[0], specs[1]
        outs = ((q_spec, kv_spec, kv_spec) if backward else (q_spec, q_spec[:3]))
        outs += tuple((None,) * len(x.shape) for x in result_shapes[len(outs):])

        def lower(*args):
            results = body(*args)
            if not backward:
                return results
            dq, dk, dv, *dconsts = results
            if split.slice_kv:  # the shard's key/value head, summed over the head shards
                kv = split.first_head(local) // problem.groups
                dk, dv = (jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(
                    jnp.zeros_like(x), d, kv, axis=1), _axes(split.heads))
                          for x, d in ((args[1], dk), (args[2], dv)))
            return (dq, dk, dv, *(jax.lax.psum(d, split.axes) for d in dconsts))

        shard = lambda spec: NamedSharding(mesh, P(*spec))
        return mesh, lower, tuple(map(shard, outs)), tuple(map(shard, specs))

    op.def_partition(partition, decode_shardings=False,
                     sharding_rule=_rule(problem, avals, backward))
    return op


def _rule(problem: Problem, avals, backward: bool):
    """The Shardy sharding rule: operands and results share factors for the batch (b), query
    heads (h), key/value heads (g), sequences (l, s) and head dims (e, f), the sequences and
    head dims kept whole; any other dim (a broadcast one, the seed's, a captured array's) is
    a factor of its own."""
    sizes = dict(b=problem.batch, h=problem.q_heads, g=problem.kv_heads, l=problem.q_len,
                 s=problem.kv_len, e=problem.head_dim, f=problem.v_head_dim)
    own = itertools.count()
    g = "g" if problem.groups > 1 else "h"  # without GQA, heads propagate between q and k/v
    key, value = f"b{g}se", f"b{g}sf"

    def mapping(x, factors=""):  # x: an array or a shape
        shape = getattr(x, "shape", x)
        return ArrayMapping(*(f if sizes.get(f) == d else f"x{next(own)}"
                              for f, d in zip(factors.ljust(len(shape)), shape)))

    q, k, v, extras, rest = _unflat(problem, avals)
    operands = [mapping(q, "bhle"), mapping(k, key), mapping(v, value), *Extras(
        None if extras.mask is None else mapping(extras.mask, "bhls"),
        None if extras.seed is None else mapping(extras.seed),
        tuple(mapping(x, "bl") for x in extras.bounds),
        tuple(mapping(x, f) for x, f in zip(extras.segments, ("bl", "bs"))),
        None if extras.table is None else mapping(extras.table, "bh"),
        tuple(map(mapping, extras.mask_consts)), tuple(map(mapping, extras.score_consts))
    ).flat(), *(mapping(x, "bhlf") for x in rest)]
    whole = lambda factors: mapping([sizes[f] for f in factors], factors)
    if backward:
        results = [*map(whole, ("bhle", key, value)), *map(
            mapping, tile_math.differentiable_consts(problem, extras))]
    else:
        results = [whole("bhlf"), whole("bhl")]
    used = dict.fromkeys(f for m in operands + results for f in m)  # in the rule's order
    return SdyShardingRule(tuple(operands), tuple(results),
                           need_replication_factors=tuple(f for f in used if f in "lsef"))


def split_plan(problem: Problem, plan) -> tuple[tuple[str, str | None, str | None], ...]:
    """``plan`` with, per platform, a third entry: the kernel to run where XLA's partitioner
    splits the op with no partitioning rule (see the module docstring), i.e. the planned one
    if XLA can split it, else the first eligible partitionable one (None where there is none:
    the planned kernel runs, gathered)."""
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
    splits the op (``automatic_split``) over a mesh, a custom-call kernel runs per shard
    (``automatic``: its shard and what is gathered are noted); with no mesh it gives way to
    the partitionable kernel that runs in its place (``split_plan``), or, with none eligible,
    runs gathered."""
    where = automatic_split(query)
    if where is None:
        return explanation
    problem, rows = explanation.problem, list(explanation.rows)
    mesh = getattr(query.sharding, "mesh", None)
    mesh = mesh if mesh is not None and partitioning.of_devices(mesh) else None
    for platform, name, split in split_plan(problem, select.plan(problem)):
        if name == split:
            continue
        at = {v.backend.value: i for i, v in enumerate(rows) if v.platform == platform}
        planned = rows[at[name]]
        if mesh is not None:
            rows[at[name]] = dataclasses.replace(planned, config="; ".join(filter(None, (
                f"per shard over {where}: {_shard_note(problem, mesh, query)}",
                planned.config))))
        elif split is None:
            rows[at[name]] = dataclasses.replace(planned, config="; ".join(filter(None, (
                planned.config, f"gathered: with no mesh of this process's devices, this custom "
                f"call has no partitioning rule over {where}, so every device runs the whole "
                f"problem"))))
        else:
            rows[at[name]] = dataclasses.replace(planned, chosen=False, config=None, reasons=(
                f"with no mesh of this process's devices, a custom call has no partitioning "
                f"rule: over {where} {split} runs in its place (for {name} per shard, shard "
                f"the query over a jax.make_mesh mesh)",))
            rows[at[split]] = dataclasses.replace(rows[at[split]], chosen=True, config="; ".join(
                filter(None, (f"in place of {name} over {where}",
                              select.config_description(select.Backend(split), problem)))))
    return dataclasses.replace(explanation, rows=tuple(rows))


def _shard_note(problem: Problem, mesh, query) -> str:
    """Each device's query shard under ``automatic``, and what the partitioner gathers first."""
    spec = tuple(query.sharding.spec) + (None,) * (4 - len(query.sharding.spec))
    split = _automatic_split(problem, mesh, spec)
    local = (problem.batch // _size(mesh, split.batch), problem.q_heads // _size(mesh, split.heads),
             problem.q_len, problem.head_dim)
    notes = [f"the {dim} dim split over {got!r} is gathered first" + (
                 f" ({error})" if dim == "head" and (error := head_split_error(
                     problem, _size(mesh, got), got)) else
                 " (sdpa splits over batch and heads only: for a split sequence use a "
                 "context-parallel layout)" if dim == "sequence" else "")
             for dim, got, kept in zip(_DIMS, spec, (split.batch, split.heads, None, None))
             if got is not None and got != kept]
    return "; ".join([f"each device runs its {local} query shard", *notes])
