"""``sdpa``: validates inputs, folds them into one canonical ``Problem``, picks kernels, and binds
the attention primitive. The contract is ``torch.nn.functional.scaled_dot_product_attention``'s."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformax import tuning
from transformax.attention import select
from transformax.attention.masks import CausalMask
from transformax.attention.primitive import attention, current_platform
from transformax.attention.problem import Problem

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
                 dropout_rng):
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
        self.causal_offset = 0 if is_causal else None
        self.mask = None
        mask_dtype = mask_shape = None
        if isinstance(attn_mask, CausalMask):
            if attn_mask.shape != (self.q_len, self.kv_len):
                raise ValueError(f"sdpa: attn_mask is a causal mask for (L, S) = {attn_mask.shape} "
                                 f"but query/key give (L, S) = {(self.q_len, self.kv_len)}")
            self.causal_offset = attn_mask.offset
        elif attn_mask is not None:
            self.mask = self._fold_mask(jnp.asarray(attn_mask), q.dtype)
            mask_dtype, mask_shape = np.dtype(self.mask.dtype), tuple(self.mask.shape)
        self.seed = None
        if dropout_p > 0.0:
            self.seed = jax.random.bits(dropout_rng, (2,), jnp.uint32)
        self.problem = Problem(
            batch=self.q.shape[0], q_heads=self.q.shape[1], kv_heads=self.k.shape[1],
            q_len=self.q_len, kv_len=self.kv_len, head_dim=self.head_dim,
            v_head_dim=v.shape[-1], dtype=np.dtype(q.dtype), scale=self.scale,
            causal_offset=self.causal_offset, mask_dtype=mask_dtype, mask_shape=mask_shape,
            dropout_p=float(dropout_p))

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

    def run(self, plan):
        p = self.problem
        if self.is_empty:  # no keys (or no queries): every row attends to nothing, as in torch
            out = jnp.zeros((p.batch, p.q_heads, p.q_len, p.v_head_dim), self.q.dtype)
            lse = jnp.full(out.shape[:-1], -jnp.inf, p.acc_dtype)
        else:
            out, lse = attention(p, plan, self.q, self.k, self.v, self.mask, self.seed)
        out = out.reshape(*self.batch_shape, self.q_len, out.shape[-1])
        return out, lse.reshape(*self.batch_shape, self.q_len)


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
    problem, platform = call.problem, current_platform()
    plan = None if call.is_empty else select.plan(problem)
    if plan is not None and dict(plan).get(platform) is None:
        raise select.no_kernel_error(problem, platform)
    if plan is not None:
        call.problem = select.with_configs(problem, plan)
    out, lse = call.run(plan)
    return (out, lse) if return_lse else out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False, *, dropout_rng=None, return_lse=False) -> select.Explanation:
    """Which kernel ``sdpa`` would run on each platform for these arguments, why not the
    others, the chosen configurations, and the cost (FLOPs, temporaries). ``print()`` it for a
    table. Arrays may be ``jax.ShapeDtypeStruct``s: nothing is computed or allocated."""
    del return_lse
    if dropout_p > 0.0 and dropout_rng is None:
        dropout_rng = jax.random.key(0)  # only the problem's shape matters here
    problems = []

    def probe(query, key, value, attn_mask, dropout_rng):
        problems.append(_Call(query, key, value, attn_mask, dropout_p, is_causal, scale,
                              enable_gqa, dropout_rng).problem)
        return ()

    jax.eval_shape(probe, query, key, value, attn_mask, dropout_rng)
    return select.explanation(problems[0])


def autotune(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False, *, dropout_rng=None, return_lse=False) -> select.Explanation:
    """Times candidate configurations of the kernels that would run these arguments (forward and
    backward, on this host), stores the winners in the tuning cache (``transformax.tuning``), and
    returns ``explain``'s report, which shows them. Later calls of the same problem class use
    them."""
    with tuning.autotuning():
        return explain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                       dropout_rng=dropout_rng, return_lse=return_lse)
