"""``sdpa``: validates inputs, folds them into one canonical ``Problem``, picks kernels, and binds
the attention primitive. The contract is ``torch.nn.functional.scaled_dot_product_attention``'s."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from transformax import tuning
from transformax.attention import masks, partition, select
from transformax.attention.primitive import attention, current_platform
from transformax.attention.problem import Extras, Problem, hoist

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def _desc(name: str, x) -> str:
    return f"{name} (shape {tuple(x.shape)}, dtype {x.dtype})"


def _broadcast(shapes: dict[str, tuple[int, ...]], what: str) -> tuple[int, ...]:
    try:
        return tuple(jnp.broadcast_shapes(*shapes.values()))
    except ValueError:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"sdpa: {what} do not broadcast: {listed}") from None


def _fold(x, outer: tuple[int, ...], heads: int):
    """``(..., h, N, D)`` -> ``(B, heads, N, D)``, broadcasting leading dims (h is 1 or heads)."""
    x = x.reshape((1,) * (len(outer) + 3 - x.ndim) + x.shape)
    x = jnp.broadcast_to(x, (*outer, heads, *x.shape[-2:]))
    return x.reshape(math.prod(outer), heads, *x.shape[-2:])


class _Call:
    """One validated ``sdpa`` call in canonical form."""

    def __init__(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 dropout_rng, score_mod=None):
        q, k, v = (jnp.asarray(x) for x in (query, key, value))
        for name, x in (("query", q), ("key", k), ("value", v)):
            if x.ndim < 2:
                raise ValueError(f"sdpa: {_desc(name, x)} must have rank >= 2 (..., L, E)")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"sdpa: query, key and value must share one dtype; got "
                            f"{_desc('query', q)}, {_desc('key', k)}, {_desc('value', v)}")
        if q.dtype not in _FLOATS:
            raise TypeError(f"sdpa: {_desc('query', q)} must be float32, bfloat16, float16 "
                            f"or float64")
        if q.shape[-1] == 0:
            raise ValueError(f"sdpa: {_desc('query', q)} has head dim (E) 0; expected >= 1")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"sdpa: the last dim (E) of {_desc('query', q)} and "
                             f"{_desc('key', k)} must match")
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(f"sdpa: the sequence dim (S) of {_desc('key', k)} and "
                             f"{_desc('value', v)} must match")
        dropout_p, is_causal = _concrete(dropout_p, "dropout_p"), _static_bool(is_causal)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"sdpa: dropout_p must be in [0, 1); got {dropout_p!r}")
        if dropout_p > 0.0 and dropout_rng is None:
            raise ValueError(f"sdpa: dropout_p={dropout_p} needs dropout_rng (a JAX PRNG key)")
        if attn_mask is not None and is_causal:
            raise ValueError("sdpa: pass either attn_mask or is_causal=True, not both "
                             "(for bottom-right causal use attn_mask=tfx.causal_lower_right(L, S))")
        self.q_len, self.kv_len, self.head_dim = q.shape[-2], k.shape[-2], q.shape[-1]

        if enable_gqa:
            self._fold_gqa(q, k, v)
        else:
            self._fold_broadcast(q, k, v)
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else _concrete(scale, "scale")
        batch, heads = self.q.shape[:2]
        fields, extras = {"causal_offset": 0 if is_causal else None}, {}
        self.hull_exact = None
        if isinstance(attn_mask, masks.Mask):
            self._structure(attn_mask, batch, heads, fields, extras)
        elif attn_mask is not None:
            mask = self._fold_mask(jnp.asarray(attn_mask), q.dtype)
            fields.update(mask_dtype=np.dtype(mask.dtype), mask_shape=tuple(mask.shape))
            extras["mask"] = mask
        if dropout_p > 0.0:
            extras["seed"] = jax.random.bits(dropout_rng, (2,), jnp.uint32)
        if score_mod is not None:
            if not callable(score_mod):
                raise TypeError(f"flex_attention: score_mod must be a function (score, b, h, "
                                f"q_idx, kv_idx) -> score; got {type(score_mod).__name__}")
            acc = jnp.promote_types(q.dtype, jnp.float32)
            fields["score_fn"], extras["score_consts"] = hoist(
                score_mod, "score_mod", acc, *[jnp.int32] * 4)
        self.extras = Extras(**extras)
        self.problem = Problem(
            batch=batch, q_heads=heads, kv_heads=self.k.shape[1], q_len=self.q_len,
            kv_len=self.kv_len, head_dim=self.head_dim, v_head_dim=v.shape[-1],
            dtype=np.dtype(q.dtype), scale=self.scale, dropout_p=float(dropout_p), **fields)

    def _structure(self, mask: masks.Mask, batch: int, heads: int, fields: dict, extras: dict):
        """A structured mask -> the problem's mask fields and operands (see ``masks.structure``)."""
        for what, got, want in (("query length L", mask.q_len, self.q_len),
                                ("key length S", mask.kv_len, self.kv_len),
                                ("batch size", mask.batch_size, batch)):
            if got is not None and got != want and not (what == "batch size" and got == 1):
                raise ValueError(f"sdpa: attn_mask is a {type(mask).__name__} mask for "
                                 f"{what} {got} but query/key give {want} (shapes "
                                 f"(L, S) = {(self.q_len, self.kv_len)}, batch {batch})")
        form = masks.structure(mask, batch, heads, self.q_len, self.kv_len)
        self.hull_exact = form.hull_exact
        fields["causal_offset"] = form.causal_offset
        if form.bounds is not None:
            fields["bounds"], extras["bounds"] = form.bounds[0].shape[0], form.bounds
        if form.segments is not None:
            fields["segments"], extras["segments"] = form.segments[0].shape[0], form.segments
        if form.generic is not None:
            fields["mask_fn"], extras["mask_consts"] = hoist(
                form.generic.mask_mod, "mask_mod", *[jnp.int32] * 4)
        if form.table is not None:
            table, blocks = form.table
            if table.shape[0] not in (1, batch) or table.shape[1] not in (1, heads):
                raise ValueError(f"sdpa: the block mask is for (B, H) = {table.shape[:2]} but "
                                 f"the call has (B, H) = {(batch, heads)}")
            fields["table_blocks"], extras["table"] = blocks, table

    def _fold_broadcast(self, q, k, v):
        batch = _broadcast({"query": q.shape[:-2], "key": k.shape[:-2], "value": v.shape[:-2]},
                           "the batch dims of query, key and value")
        self.batch_shape = batch
        outer, heads = (batch[:-1], batch[-1]) if batch else ((), 1)
        # A key/value head dim of 1 broadcast over heads is multi-query attention: no copy.
        kv_heads = 1 if all(x.ndim < 3 or x.shape[-3] == 1 for x in (k, v)) else heads
        self.q = _fold(q, outer, heads)
        self.k, self.v = _fold(k, outer, kv_heads), _fold(v, outer, kv_heads)

    def _fold_gqa(self, q, k, v):
        for name, x in (("query", q), ("key", k), ("value", v)):
            if x.ndim < 3:
                raise ValueError(f"sdpa: enable_gqa needs a head dim: {_desc(name, x)} must "
                                 f"have rank >= 3 (..., H, L, E)")
        heads = q.shape[-3]
        for name, x in (("key", k), ("value", v)):
            if heads % x.shape[-3]:
                raise ValueError(f"sdpa: enable_gqa needs the query heads ({heads}) to be a "
                                 f"multiple of the {name} heads; got {_desc('query', q)}, "
                                 f"{_desc(name, x)}")
        outer = _broadcast({"query": q.shape[:-3], "key": k.shape[:-3], "value": v.shape[:-3]},
                           "the batch dims (before the head dim) of query, key and value")
        self.batch_shape = (*outer, heads)
        kv_heads = k.shape[-3] if k.shape[-3] == v.shape[-3] else heads
        if kv_heads == heads:
            k = jnp.repeat(k, heads // k.shape[-3], axis=-3)
            v = jnp.repeat(v, heads // v.shape[-3], axis=-3)
        self.q = _fold(q, outer, heads)
        self.k, self.v = _fold(k, outer, kv_heads), _fold(v, outer, kv_heads)

    def _fold_mask(self, mask, dtype):
        if mask.dtype not in (jnp.bool_, jnp.float32, dtype):
            raise TypeError(f"sdpa: {_desc('attn_mask', mask)} must be bool, float32 or the "
                            f"query's dtype ({dtype})")
        target = (*self.batch_shape, self.q_len, self.kv_len)
        if mask.ndim > len(target) or _broadcast_or_none(mask.shape, target) != target:
            raise ValueError(f"sdpa: {_desc('attn_mask', mask)} does not broadcast to "
                             f"(..., Hq, L, S) = {target}")
        mask = mask.reshape((1,) * (len(target) - mask.ndim) + mask.shape)
        if mask.ndim == 2:  # rank-2 inputs: no batch or head dims
            return mask[None, None]
        if any(d != 1 for d in mask.shape[:-3]):
            mask = jnp.broadcast_to(mask, (*target[:-3], *mask.shape[-3:]))
        return mask.reshape(-1, *mask.shape[-3:])

    @property
    def is_empty(self) -> bool:
        p = self.problem
        return 0 in (p.batch, p.q_heads, p.q_len, p.kv_len)

    def run(self, problem: Problem, extras: Extras):
        """``(out, lse)`` of ``problem`` (this call's, or its ``lean`` one) by the planned
        kernels."""
        p = problem
        if self.is_empty:  # no keys (or no queries): every row attends to nothing, as in torch
            out = jnp.zeros((p.batch, p.q_heads, p.q_len, p.v_head_dim), self.q.dtype)
            lse = jnp.full(out.shape[:-1], -jnp.inf, p.acc_dtype)
        else:
            plan = select.plan(p)
            if dict(plan).get(current_platform()) is None:
                raise select.no_kernel_error(p, current_platform())
            p = select.with_configs(p, plan)
            out, lse = attention(p, plan, self.q, self.k, self.v, extras)
        out = out.reshape(*self.batch_shape, self.q_len, out.shape[-1])
        return out, lse.reshape(*self.batch_shape, self.q_len)

    def lean(self) -> tuple[Problem, Extras]:
        """The call without its generic mask_mod: right where ``hull_exact`` (the key intervals
        then hold the whole mask)."""
        return (dataclasses.replace(self.problem, mask_fn=None, table_blocks=None),
                self.extras._replace(table=None, mask_consts=()))


def _broadcast_or_none(a, b):
    try:
        return tuple(jnp.broadcast_shapes(a, b))
    except ValueError:
        return None


def _concrete(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"sdpa: {name} must be a Python float (it is part of the compiled "
                        f"kernel); got {value!r}") from None


def _static_bool(value) -> bool:
    try:
        return bool(value)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(f"sdpa: is_causal must be a Python bool (it selects the compiled "
                        f"kernel); got {value!r}") from None


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False, *, dropout_rng=None, return_lse=False):
    """Scaled dot-product attention with ``torch.nn.functional.scaled_dot_product_attention``'s
    semantics (see SEMANTICS.md): ``softmax(q @ k^T * scale + mask) @ v``.

    Args:
      query: ``(..., Hq, L, E)``; key: ``(..., Hk, S, E)``; value: ``(..., Hv, S, Ev)``.
      attn_mask: bool (True = may attend), float (added), or ``tfx.causal_*`` mask object,
        broadcastable to ``(..., Hq, L, S)``.
      dropout_p: dropout on the attention probabilities; needs ``dropout_rng``.
      is_causal: top-left causal mask (``tril(ones(L, S))``).
      scale: defaults to ``1/sqrt(E)``.
      enable_gqa: query head ``h`` uses key/value head ``h // (Hq // Hk)``.
      return_lse: also return the f32 log-sum-exp of the masked scores, ``(..., Hq, L)``.

    Returns ``(..., Hq, L, Ev)`` in the query's dtype, or ``(out, lse)``.
    """
    call = _Call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 dropout_rng)
    return _attend(call, return_lse)


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False):
    """torch's ``flex_attention``: ``softmax(score_mod(q @ k^T * scale) masked by block_mask) @ v``.

    Args:
      query: ``(..., Hq, L, E)``; key: ``(..., Hk, S, E)``; value: ``(..., Hk, S, Ev)``.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` of scalars (applied to
        every element), using jnp ops; arrays it captures get gradients where they are floats.
      block_mask: ``tfx.create_block_mask(...)`` or any structured mask (``tfx.band``,
        ``tfx.document_mask``, ...); None attends everywhere.
      scale: defaults to ``1/sqrt(E)``. enable_gqa: query head ``h`` uses key/value head
        ``h // (Hq // Hk)``. return_lse: also return the log-sum-exp (natural log).

    Rows whose keys are all masked give zeros (and an lse of -inf). Compiled kernels are keyed
    by what ``score_mod`` and the mask compute (their jaxpr), not by the function objects: an
    eager call with a lambda written anew each time compiles only once. (Under ``jit``, as in
    torch, a block mask's ``mask_mod`` is static: a new function object passed as an argument
    retraces the caller's jitted function; capture changing values as arrays instead.)
    """
    if block_mask is not None and not isinstance(block_mask, masks.Mask):
        raise TypeError(f"flex_attention: block_mask must come from tfx.create_block_mask or "
                        f"be a structured mask (tfx.band, tfx.document_mask, ...); got "
                        f"{type(block_mask).__name__}")
    call = _Call(query, key, value, block_mask, 0.0, False, scale, enable_gqa, None,
                 score_mod=score_mod)
    return _attend(call, return_lse)


def _attend(call: _Call, return_lse: bool):
    """Runs ``call``. A block mask whose row hulls are exact (``create_block_mask`` found every
    row's visible keys contiguous: documents, windows, causal) runs on its key intervals alone,
    the mask_mod never evaluated again: chosen here where that is known, else by ``lax.cond``
    (a block mask traced under ``jit``; under ``vmap``, one branch for the whole batch:
    ``_all_over_vmap``)."""
    full, exact = (call.problem, call.extras), call.hull_exact
    try:
        exact = None if exact is None else bool(exact)
    except jax.errors.ConcretizationTypeError:
        out, lse = jax.lax.cond(_all_over_vmap(exact), lambda: call.run(*call.lean()),
                                lambda: call.run(*full))
    else:
        out, lse = call.run(*(call.lean() if exact else full))
    return (out, lse) if return_lse else out


@jax.custom_batching.custom_vmap
def _all_over_vmap(flag):
    """``flag``; under ``vmap``, whether it holds for every element, unbatched: a ``lax.cond``
    on it stays one branch (a batched predicate runs both and selects). For a choice between a
    fast path valid where ``flag`` holds and a path valid everywhere."""
    return flag


@_all_over_vmap.def_vmap
def _all_over_vmap_rule(axis_size, in_batched, flag):
    del axis_size
    return (jnp.all(flag) if in_batched[0] else flag), False


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False, *, dropout_rng=None, return_lse=False,
            score_mod=None) -> select.Explanation:
    """Which kernel ``sdpa`` (or ``flex_attention``, given a ``score_mod``) would run on each
    platform for these arguments, why not the others, the chosen configurations, and the cost
    (FLOPs, temporaries). ``print()`` it for a table. Arrays may be ``jax.ShapeDtypeStruct``s:
    nothing is computed or allocated. Where the query's sharding leaves the op to XLA's
    partitioner (several devices, no explicit mesh axis splitting it), the report shows the
    query shard each device runs the kernel on and what is gathered first, or, with no mesh of
    this process's devices, the plain-XLA kernel that runs in place of a custom-call one."""
    del return_lse
    if dropout_p > 0.0 and dropout_rng is None:
        dropout_rng = jax.random.key(0)  # only the problem's shape matters here
    problems = []

    def probe(query, key, value, attn_mask, dropout_rng):
        problems.append(_Call(query, key, value, attn_mask, dropout_p, is_causal, scale,
                              enable_gqa, dropout_rng, score_mod=score_mod).problem)
        return ()

    jax.eval_shape(probe, query, key, value, attn_mask, dropout_rng)
    return partition.explained(select.explanation(problems[0]), query)


def autotune(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False, *, dropout_rng=None, return_lse=False) -> select.Explanation:
    """Times candidate configurations of the kernels that would run these arguments (forward and
    backward, on this host), stores the winners in the tuning cache (``transformax.tuning``), and
    returns ``explain``'s report, which shows them. Later calls of the same problem class use
    them."""
    with tuning.autotuning():
        return explain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                       dropout_rng=dropout_rng, return_lse=return_lse)
