"""The canonical attention problem every kernel receives, and helpers kernels share.

Canonical operands: query ``(B, Hq, L, E)``, key ``(B, Hk, S, E)``, value ``(B, Hk, S, Ev)``
with ``Hq % Hk == 0`` (query head ``h`` reads key/value head ``h // (Hq // Hk)``), and the
``Extras``: a dense mask, a dropout seed, the structured mask's arrays, the score_mod's captured
arrays, each present only where the ``Problem`` says so.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core


class Hoisted:
    """A function of scalars whose captured arrays are explicit trailing arguments:
    ``fn(*scalars, *consts)``. Static, and equal to another with the same computation (the same
    jaxpr text: operations, literals, the consts' shapes and dtypes), so a call with a new
    function object that computes the same thing (a lambda written in the call, a mask_mod
    capturing other values) reuses the compiled kernels; the consts travel as operands, so the
    function also runs inside the kernels' own traces, and autodiff reaches them."""

    def __init__(self, jaxpr, name: str, differentiable: tuple[bool, ...]):
        self.jaxpr, self.name, self.differentiable = jaxpr, name, differentiable
        used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
        # Which scalar arguments the function reads (a mask independent of b or h is
        # evaluated once for every batch row or head).
        self.depends = tuple(id(v) in used for v in jaxpr.invars)
        self._key = (str(jaxpr), name, differentiable)

    def __eq__(self, other) -> bool:
        return isinstance(other, Hoisted) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    @property
    def n_consts(self) -> int:
        return len(self.differentiable)

    def __call__(self, *args):
        n = len(self.jaxpr.invars)
        return run_jaxpr(self.jaxpr, args[n:], args[:n], _bind_here)[0]

    def __repr__(self) -> str:
        return f"<{self.name}>"


# Calls whose bodies are run inline: a hook's ops are replayed one by one, so a custom_jvp's
# rule is not used (autodiff goes through its body).
_INLINED_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                 "remat", "checkpoint"}


def run_jaxpr(jaxpr, consts, args, bind, wrap_const=lambda c: c) -> list:
    """The outputs of ``jaxpr`` on ``args``: calls inlined (their consts through
    ``wrap_const``), every other equation through ``bind(eqn, operands) -> outputs``."""
    env = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    for var, value in (*zip(jaxpr.constvars, consts), *zip(jaxpr.invars, args)):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name in _INLINED_CALLS:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs = run_jaxpr(getattr(sub, "jaxpr", sub),
                             [wrap_const(c) for c in getattr(sub, "consts", ())], ins, bind,
                             wrap_const)
        else:
            outs = bind(eqn, ins)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _bind_here(eqn, ins) -> list:
    """``eqn`` bound in the caller's context, not the one it was traced in (inside a
    shard_map, say, for a hook traced under an explicit mesh), its operands cast to vary alike
    (the casts recorded when it was traced are dropped: they were for that context)."""
    if eqn.primitive.name == "pvary":
        return ins
    outs = eqn.primitive.bind(*same_varying_axes(*ins), **eqn.params)
    return outs if eqn.primitive.multiple_results else [outs]


def _varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (inside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10+; earlier jax calls it vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def same_varying_axes(*args) -> tuple:
    """``args`` cast to vary over the union of their manual axes, as jax's op wrappers do."""
    axes = frozenset().union(*(_varying_axes(x) for x in args))
    return tuple(x if not (missing := axes - _varying_axes(x))
                 else jax.lax.pcast(x, tuple(sorted(missing)), to="varying") for x in args)


def hoist(fn, name: str, *scalar_dtypes) -> tuple[Hoisted, tuple]:
    """``fn`` of scalars of ``scalar_dtypes`` as a ``Hoisted`` and the arrays it captures."""
    closed = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct((), d) for d in scalar_dtypes))
    if len(closed.out_avals) != 1 or closed.out_avals[0].shape != ():
        raise ValueError(f"{name} must return one scalar per element (it is applied "
                         f"elementwise, as in torch); it returned {closed.out_avals}")
    consts = tuple(closed.consts)
    differentiable = tuple(bool(jnp.issubdtype(jnp.result_type(c), jnp.inexact)) for c in consts)
    return Hoisted(closed.jaxpr, name, differentiable), consts


class Extras(NamedTuple):
    """The operands beside q, k, v (None or empty where the problem has none)."""

    mask: jax.Array | None = None  # dense (Bm, Hm, Lm, Sm): bool selects, float adds
    seed: jax.Array | None = None  # uint32[2] dropout seed
    bounds: tuple = ()  # (lo, hi): int32 (Bm, L); key j visible iff lo <= j < hi
    segments: tuple = ()  # (q_ids (Bm, L), kv_ids (Bm, S)): int32; visible iff equal
    table: jax.Array | None = None  # int8 (Bm, Hm, nq, nk) block classes of mask_fn
    mask_consts: tuple = ()  # the generic mask_mod's captured arrays
    score_consts: tuple = ()  # the score_mod's captured arrays

    def flat(self) -> list:
        return [x for x in (self.mask, self.seed, *self.bounds, *self.segments, self.table,
                            *self.mask_consts, *self.score_consts) if x is not None]

    @classmethod
    def unflat(cls, problem: "Problem", flat) -> tuple["Extras", list]:
        """``flat`` -> (Extras, the operands after them)."""
        it = iter(flat)
        take = lambda present, n=1: tuple(next(it) for _ in range(n)) if present else ()
        mask, = take(problem.has_mask) or (None,)
        seed, = take(problem.has_dropout) or (None,)
        bounds = take(problem.bounds is not None, 2)
        segments = take(problem.segments is not None, 2)
        table, = take(problem.table_blocks is not None) or (None,)
        mask_consts = take(problem.mask_fn is not None, _n_consts(problem.mask_fn))
        score_consts = take(problem.score_fn is not None, _n_consts(problem.score_fn))
        return cls(mask, seed, bounds, segments, table, mask_consts, score_consts), list(it)


def _n_consts(fn: Hoisted | None) -> int:
    return 0 if fn is None else fn.n_consts


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call (hashable: a primitive parameter)."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    dtype: np.dtype
    scale: float
    causal_offset: int | None = None  # key j visible to query i iff j <= i + offset
    mask_dtype: np.dtype | None = None  # bool: True = may attend; float: added to scores
    mask_shape: tuple[int, int, int, int] | None = None
    dropout_p: float = 0.0
    bounds: int | None = None  # Bm of the per-row key intervals (lo, hi)
    segments: int | None = None  # Bm of the segment ids
    mask_fn: Hoisted | None = None  # generic mask_mod(b, h, q_idx, kv_idx, *consts) -> bool
    table_blocks: tuple[int, int] | None = None  # (block_q, block_k) of mask_fn's block table
    score_fn: Hoisted | None = None  # score_mod(score, b, h, q_idx, kv_idx, *consts)
    # ((kernel name, 'fwd' | 'bwd'), config) for the planned kernels that have configs.
    kernel_configs: tuple = ()

    def kernel_config(self, kernel: str, pass_: str):
        """The configuration chosen for ``kernel``'s ``pass_`` when this call was planned."""
        return dict(self.kernel_configs).get((kernel, pass_))

    @property
    def acc_dtype(self) -> np.dtype:
        """Scores, softmax statistics and accumulators: f32, or f64 for f64 inputs."""
        return np.dtype(jnp.promote_types(self.dtype, jnp.float32))

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def has_mask(self) -> bool:
        return self.mask_shape is not None

    @property
    def mask_is_bool(self) -> bool:
        return self.mask_dtype == np.dtype(bool)

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def structured(self) -> bool:
        """A mask beyond a static causal offset or a dense array: intervals, segments, a
        mask_mod (they are in ``Extras``)."""
        return self.bounds is not None or self.segments is not None or self.mask_fn is not None

    def features(self) -> set[str]:
        """What this call needs beyond plain attention, by name, for ``reasons_unsupported``."""
        named = {"dense mask": self.has_mask, "dropout": self.has_dropout,
                 "key intervals": self.bounds is not None,
                 "segment ids": self.segments is not None, "mask_mod": self.mask_fn is not None,
                 "score_mod": self.score_fn is not None}
        return {name for name, used in named.items() if used}

    def visible_pairs(self) -> int:
        """(query, key) pairs the causal structure leaves visible, per batch and head."""
        if self.causal_offset is None:
            return self.q_len * self.kv_len
        offset = self.causal_offset
        first = min(max(0, -offset), self.q_len)  # rows before it see no key
        full = min(max(first, self.kv_len - offset - 1), self.q_len)  # rows from it see all
        return sum_range(first, full, offset + 1) + (self.q_len - full) * self.kv_len

    def flops(self) -> tuple[float, float]:
        """Estimated FLOPs of the forward and of forward + backward (2.5x the forward more)."""
        forward = 2.0 * self.batch * self.q_heads * self.visible_pairs() * (
            self.head_dim + self.v_head_dim)
        return forward, 3.5 * forward


def sum_range(start: int, stop: int, shift: int) -> int:
    """sum(i + shift for i in range(start, stop))."""
    return (stop - start) * (start + stop - 1) // 2 + (stop - start) * shift


def cdiv(a: int, b: int) -> int:
    """Ceiling division: the number of ``b``-sized blocks covering ``a``."""
    return -(-a // b)
