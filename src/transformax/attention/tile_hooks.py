"""A ``score_mod`` / ``mask_mod`` (a ``Hoisted`` function of scalars) run on a whole tile at once,
reading its captured arrays through loads at the tile's positions: how kernels whose lowering
has no gather (Pallas Triton, Mosaic) run hooks that index captured arrays (``slopes[h]``,
``table[q_idx - kv_idx]``, ``ids[b][q_idx]``).

The hook's jaxpr runs equation by equation on arrays holding each element's scalar (broadcast
like the tile's index vectors). Indexing a captured array by position (``dynamic_slice``, then
``squeeze`` / ``reshape`` of the unit dims: what jnp's integer indexing traces to) is deferred
until every dimension is fixed, then becomes one ``load(array, indices)``: a vector load from a
ref inside a kernel, an ordinary gather on arrays. Indices are clamped into range, as XLA clamps
them. Other uses of a captured array read it whole. Anything else that would need a gather
raises ``Unsupported`` naming it; ``check`` reports that before a kernel is chosen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

from transformax.attention.problem import Hoisted, run_jaxpr

# Scalar-to-scalar shape changes (no-ops per element).
_SHAPING = {"broadcast_in_dim", "reshape", "squeeze", "copy"}


class Unsupported(NotImplementedError):
    """The hook does something a tile evaluation cannot express with loads."""


@dataclasses.dataclass(frozen=True)
class _View:
    """``array`` indexed by position, not read yet. ``index``: per dim of ``array``, None (not
    indexed) or its int32 index; ``kept``: whether the dim is still one of the value's (an
    indexed dim stays, of size 1, until squeezed)."""

    array: Any
    dtype: Any  # the captured array's own (a kernel may hold it widened)
    index: tuple
    kept: tuple

    @classmethod
    def of(cls, array, dtype=None):
        return cls(array, dtype or array.dtype, (None,) * jnp.ndim(array),
                   (True,) * jnp.ndim(array))

    @property
    def dims(self) -> list[int]:
        """The array dim of each of the value's dims."""
        return [d for d, kept in enumerate(self.kept) if kept]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(1 if self.index[d] is not None else jnp.shape(self.array)[d]
                     for d in self.dims)

    def replace(self, index=None, kept=None) -> "_View":
        return _View(self.array, self.dtype, self.index if index is None else tuple(index),
                      self.kept if kept is None else tuple(kept))


def default_load(array, index):
    """``array`` whole (``index`` None) or at ``index`` (int32 arrays broadcast together)."""
    if index is None:
        return array[...]
    if any(jnp.ndim(i) for i in index):
        index = jnp.broadcast_arrays(*index)
    return array[tuple(index)]


def evaluate(fn: Hoisted, args, consts, load=default_load):
    """``fn`` on every element of the broadcast of ``args`` (arrays of int32 indices and, for a
    score_mod, the scores), its captured ``consts`` read through ``load`` (arrays or refs)."""
    args = [jnp.asarray(a) for a in args]
    views = [_View.of(c, v.aval.dtype) for c, v in zip(consts, fn.jaxpr.constvars)]
    out, = _run(fn.jaxpr, views, args, load)
    out = _read(out, load)
    return jnp.broadcast_to(out, jnp.broadcast_shapes(*(a.shape for a in args)))


@functools.lru_cache(maxsize=256)
def check(fn: Hoisted) -> tuple[tuple, ...]:
    """What ``evaluate`` does with ``fn``'s captured arrays on a tile (traced abstractly:
    nothing runs): raises ``Unsupported``, or returns per captured array the shapes its loads'
    indices broadcast to: None for a whole read, ``()`` where they depend on the batch and head
    alone, a tile shape where they vary per element."""
    loads = [[] for _ in fn.jaxpr.constvars]

    def run(*consts):
        def record(array, index):
            shape = None if index is None else jnp.broadcast_shapes(*map(jnp.shape, index))
            loads[next(i for i, c in enumerate(consts) if c is array)].append(shape)
            return default_load(array, index)

        args = [jnp.zeros((), v.aval.dtype) for v in fn.jaxpr.invars]
        args[-2:] = jnp.zeros((2, 1), jnp.int32), jnp.zeros((1, 3), jnp.int32)  # q, kv
        if len(args) == 5:  # a score_mod: the scores are a tile too
            args[0] = jnp.zeros((2, 3), args[0].dtype)
        return evaluate(fn, args, consts, record)

    jax.eval_shape(run, *(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                          for v in fn.jaxpr.constvars))
    return tuple(tuple(x) for x in loads)


def scalar_only(fn: Hoisted) -> tuple[bool, ...]:
    """Per captured array of ``fn``: whether every read of it is of one element at a position
    given by the batch and head alone (``slopes[h]``: a scalar load, e.g. from TPU SMEM)."""
    return tuple(bool(loads) and all(shape == () for shape in loads) for loads in check(fn))


def _read(x, load):
    """A value: a view becomes its load (whole, or at its indices once all are fixed)."""
    if not isinstance(x, _View):
        return x
    if all(i is None for i in x.index):
        return load(x.array, None).astype(x.dtype)
    if all(i is not None for i in x.index) and not any(x.kept):
        return load(x.array, x.index).astype(x.dtype)
    raise Unsupported(f"a captured array of shape {tuple(jnp.shape(x.array))} is used after "
                      f"indexing only some of its dims (index it down to one element)")


def _dynamic_slice(view: _View, starts, params) -> _View:
    index = list(view.index)
    for d, start, size, full in zip(view.dims, starts, params["slice_sizes"], view.shape):
        if size == full:
            continue
        if size != 1:
            raise Unsupported("a captured array sliced to more than one element per position")
        n = jnp.shape(view.array)[d]
        index[d] = jnp.clip(jnp.asarray(start, jnp.int32), 0, n - 1)
    return view.replace(index=index)


def _squeeze(view: _View, dims) -> _View:
    kept, index = list(view.kept), list(view.index)
    for d in (view.dims[i] for i in dims):
        kept[d] = False
        if index[d] is None:  # a dim of size 1
            index[d] = jnp.int32(0)
    return view.replace(index=index, kept=kept)


def _reshape(view: _View, params) -> _View:
    unit = [i for i, d in enumerate(view.dims) if view.shape[i] == 1]
    rest = tuple(s for i, s in enumerate(view.shape) if i not in unit)
    if tuple(params["new_sizes"]) != rest:
        raise Unsupported(f"a captured array reshaped from {view.shape} to "
                          f"{tuple(params['new_sizes'])}")
    return _squeeze(view, unit)


def _run(jaxpr, consts, args, load) -> list:
    def step(eqn, ins):
        name = eqn.primitive.name
        if ins and isinstance(ins[0], _View) and name in ("dynamic_slice", "squeeze", "reshape"):
            view, rest = ins[0], [_read(x, load) for x in ins[1:]]
            return [_dynamic_slice(view, rest, eqn.params) if name == "dynamic_slice" else
                    _squeeze(view, eqn.params["dimensions"]) if name == "squeeze" else
                    _reshape(view, eqn.params)]
        return _bind(eqn, [_read(x, load) for x in ins])

    return run_jaxpr(jaxpr, consts, args, step, _View.of)


def _bind(eqn, ins) -> list:
    """``eqn`` on whole values, or elementwise on per-element ones."""
    avals = [v.aval for v in eqn.invars]
    if all(jnp.shape(x) == a.shape for x, a in zip(ins, avals)):
        outs = eqn.primitive.bind(*ins, **eqn.params)
    elif eqn.primitive.name in _SHAPING and avals[0].shape == eqn.outvars[0].aval.shape == ():
        outs = ins[0]  # a scalar to a scalar: nothing to do per element
    elif (all(a.shape == () for a in avals) and all(v.aval.shape == () for v in eqn.outvars)
          and not any(_is_jaxpr(v) for v in jax.tree.leaves(eqn.params))):
        outs = eqn.primitive.bind(*jnp.broadcast_arrays(*ins), **eqn.params)
    else:
        raise Unsupported(f"{eqn.primitive.name} on values that differ per element "
                          f"(of shapes {[a.str_short() for a in avals]})")
    return outs if eqn.primitive.multiple_results else [outs]


def _is_jaxpr(x) -> bool:
    """A (closed) jaxpr: a parameter of control flow, which a tile does not map over."""
    return isinstance(x, (core.Jaxpr, core.ClosedJaxpr))
