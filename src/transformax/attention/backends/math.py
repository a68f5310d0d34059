"""The reference kernel: materialises the ``(L, S)`` scores. The oracle for every other kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transformax.attention.problem import Problem, dropout_keep, finite_or_zero, mask_scores


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


def probabilities(problem: Problem, q, k, mask, seed):
    """Returns the probabilities (in ``problem.acc_dtype``) ``(B, Hk, G, L, S)`` after dropout, and the LSE."""
    qg = _grouped(problem, q)
    acc = problem.acc_dtype
    scores = jnp.einsum("bhgle,bhse->bhgls", qg, k, preferred_element_type=acc)
    scores = scores * jnp.asarray(problem.scale, acc)
    rows = jnp.arange(problem.q_len)[:, None]
    cols = jnp.arange(problem.kv_len)[None, :]
    mask_tile = None if mask is None else _grouped(problem, mask)
    scores = mask_scores(problem, scores, rows, cols, mask_tile)
    row_max = finite_or_zero(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    visible = total > 0
    safe_total = jnp.where(visible, total, 1.0)
    lse = jnp.where(visible, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    probs = weights / safe_total
    if problem.has_dropout:
        heads = jnp.arange(problem.q_heads).reshape(problem.kv_heads, problem.groups)
        batch_head = (jnp.arange(problem.batch)[:, None, None] * problem.q_heads + heads)
        keep = dropout_keep(seed, problem.dropout_p, batch_head[..., None, None], rows, cols)
        probs = jnp.where(keep, probs / (1.0 - problem.dropout_p), 0.0)
    return probs, lse


def _forward_grouped(problem: Problem, q, k, v, mask, seed):
    probs, lse = probabilities(problem, q, k, mask, seed)
    out = jnp.einsum("bhgls,bhsd->bhgld", probs.astype(v.dtype), v,
                     preferred_element_type=problem.acc_dtype)
    shape = (problem.batch, problem.q_heads, problem.q_len)
    return out.astype(q.dtype).reshape(*shape, problem.v_head_dim), lse.reshape(shape)


def forward(problem: Problem, q, k, v, mask, seed):
    return _forward_grouped(problem, q, k, v, mask, seed)


def backward(problem: Problem, q, k, v, mask, seed, out, lse, dout, dlse):
    _, vjp = jax.vjp(lambda q, k, v: _forward_grouped(problem, q, k, v, mask, seed), q, k, v)
    return vjp((dout, dlse))


def mask_gradient(problem: Problem, q, k, v, mask, seed, dout, dlse):
    """The gradient with respect to a float ``mask``, reduced to its broadcast shape."""
    _, vjp = jax.vjp(lambda m: _forward_grouped(problem, q, k, v, m, seed), mask)
    return vjp((dout, dlse))[0]
