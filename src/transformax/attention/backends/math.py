"""The reference kernel: materialises the ``(L, S)`` scores. The oracle for every other kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transformax.attention import tile_math
from transformax.attention.problem import Extras, Problem
from transformax.attention.tile_math import Index, dropout_keep, finite_or_zero

NAME = "math"
FEATURES = frozenset({"dense mask", "dropout", "key intervals", "segment ids", "mask_mod",
                      "score_mod"})


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return []


def temporary_bytes(problem: Problem) -> int:
    """The materialised scores and probabilities, and their gradients in the backward."""
    p = problem
    return 4 * p.batch * p.q_heads * p.q_len * p.kv_len * np.dtype(p.acc_dtype).itemsize


def _grouped(problem: Problem, x):
    """``(B, Hq, ...)`` -> ``(B, Hk, G, ...)``; a broadcast head dim of 1 stays 1."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], problem.kv_heads, problem.groups, *x.shape[2:])


def _index(problem: Problem) -> Index:
    """Positions of the grouped ``(B, Hk, G, L, S)`` scores."""
    p = problem
    b = jnp.arange(p.batch, dtype=jnp.int32)[:, None, None, None, None]
    h = jnp.arange(p.q_heads, dtype=jnp.int32).reshape(1, p.kv_heads, p.groups, 1, 1)
    rows = jnp.arange(p.q_len, dtype=jnp.int32)[:, None]
    return Index(b, h, rows, jnp.arange(p.kv_len, dtype=jnp.int32)[None, :])


def raw_scores(problem: Problem, q, k):
    """``q @ k^T * scale`` in the accumulation dtype, grouped ``(B, Hk, G, L, S)``."""
    acc = problem.acc_dtype
    scores = jnp.einsum("bhgle,bhse->bhgls", _grouped(problem, q), k, preferred_element_type=acc)
    return scores * jnp.asarray(problem.scale, acc)


def probabilities(problem: Problem, q, k, extras: Extras):
    """Returns the probabilities (in ``problem.acc_dtype``) ``(B, Hk, G, L, S)`` after dropout,
    and the LSE."""
    raw = raw_scores(problem, q, k)
    mask_tile = None if extras.mask is None else _grouped(problem, extras.mask)
    idx = _index(problem)
    scores = tile_math.scores(problem, extras, raw, idx, mask_tile)
    rows, cols = idx.q, idx.kv
    row_max = finite_or_zero(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    visible = total > 0
    safe_total = jnp.where(visible, total, 1.0)
    lse = jnp.where(visible, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    probs = weights / safe_total
    if problem.has_dropout:
        heads = jnp.arange(problem.q_heads).reshape(problem.kv_heads, problem.groups)
        batch = jnp.arange(problem.batch)[:, None, None, None, None]
        keep = dropout_keep(extras.seed, problem.dropout_p, batch, heads[..., None, None],
                            problem.q_heads, rows, cols)
        probs = jnp.where(keep, probs / (1.0 - problem.dropout_p), 0.0)
    return probs, lse


def _forward(problem: Problem, q, k, v, extras: Extras):
    probs, lse = probabilities(problem, q, k, extras)
    out = jnp.einsum("bhgls,bhsd->bhgld", probs.astype(v.dtype), v,
                     preferred_element_type=problem.acc_dtype)
    shape = (problem.batch, problem.q_heads, problem.q_len)
    return out.astype(q.dtype).reshape(*shape, problem.v_head_dim), lse.reshape(shape)


def forward(problem: Problem, q, k, v, extras: Extras):
    return _forward(problem, q, k, v, extras)


def backward(problem: Problem, q, k, v, extras: Extras, out, lse, dout, dlse):
    """Autodiff through the forward; the score_mod's captured float arrays get gradients."""
    def run(q, k, v, diff):
        score_consts = tile_math.with_differentiable(problem, extras.score_consts, diff)
        return _forward(problem, q, k, v, extras._replace(score_consts=score_consts))

    _, vjp = jax.vjp(run, q, k, v, tile_math.differentiable_consts(problem, extras))
    dq, dk, dv, dconsts = vjp((dout, dlse))
    return dq, dk, dv, tuple(dconsts)


def mask_gradient(problem: Problem, q, k, v, extras: Extras, dout, dlse):
    """The gradient with respect to a float dense mask, reduced to its broadcast shape."""
    _, vjp = jax.vjp(lambda m: _forward(problem, q, k, v, extras._replace(mask=m)), extras.mask)
    return vjp((dout, dlse))[0]
