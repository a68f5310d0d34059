"""How the attention op splits over a device mesh: each device runs the kernel on its own batch
and head shard. Sequences are never split (that is context parallelism, e.g. ring attention,
which this op does not do).

- Meshes with explicit axes (shardings are part of the types): ``explicit`` runs the op under a
  ``shard_map`` over the batch/head axes of the query's sharding, so every kernel, Pallas
  included, runs on local shards. Dropout then draws an independent stream per shard (not
  the one-device stream).
- Automatic shardings (``jit`` over several devices, shardings found by propagation): the
  Pallas and FFI kernels are custom calls XLA cannot split (it would gather q/k/v to every
  device), so there the op runs the first eligible kernel made of plain XLA ops
  (``split_plan``), which XLA partitions over batch and heads like any other code. For the
  Pallas kernels per shard, use an explicit mesh or ``shard_map``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from transformax.attention import select
from transformax.attention.problem import Problem

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


def explicit(problem: Problem, fn, q, k, v, mask, seed):
    """``fn(local_problem, q, k, v, mask, seed) -> (out, lse)`` run on each device's batch/head
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
    named = [("query", q, q_spec), ("key", k, kv_spec), ("value", v, kv_spec)]
    if mask is not None:
        bm, hm = problem.mask_shape[:2]
        named.append(("attn_mask", mask, (batch if bm > 1 else None, heads if hm > 1 else None,
                                          None, None)))
    operands = [_resharded(*x) for x in named]
    specs = [P(*spec) for *_, spec in named]
    local = dataclasses.replace(
        problem, batch=problem.batch // n_batch, q_heads=problem.q_heads // n_heads,
        kv_heads=problem.kv_heads // (n_heads if split_kv else 1),
        mask_shape=None if mask is None else tuple(
            d // _size(mesh, e) for d, e in zip(problem.mask_shape, named[-1][2])))
    shard_axes = _axes(batch) + _axes(heads)

    def body(*args):
        q, k, v, *rest = args
        m = rest.pop(0) if mask is not None else None
        s = rest.pop(0) if seed is not None else None
        if s is not None:  # an independent dropout stream per shard
            index = jax.lax.axis_index(shard_axes).astype(jnp.uint32)
            s = s ^ jnp.stack([index * jnp.uint32(0x9E3779B9), jnp.uint32(0)])
        return fn(local, q, k, v, m, s)

    if seed is not None:
        operands.append(seed)
        specs.append(P())
    # Manual over every mesh axis (operands are replicated over the others): nothing is left
    # for XLA's partitioner to split, so the planned kernel runs as is.
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                         out_specs=(P(*q_spec), P(*q_spec[:3])))(*operands)


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
