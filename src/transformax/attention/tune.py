"""Configuration of the attention kernels that have one (tiles, threads, code path): the kernel
module supplies ``NAME``, ``Config``, ``default_config(problem, pass_)`` and
``candidates(problem, pass_)``; this module picks one through ``transformax.tuning`` (pinned,
cached, tuned, default) and times candidates by running the kernel itself."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformax import tuning
from transformax.attention.problem import Extras, Problem

PASSES = ("fwd", "bwd")


def _bucket(n: int) -> int:
    return min(max(1 << max(n - 1, 0).bit_length(), 128), 16384)


def problem_class(problem: Problem) -> str:
    """What a tuned configuration is keyed by (besides kernel, pass and host): dtype, head
    dims, GQA group size, mask kinds, dropout, structured-mask and score_mod features, and
    power-of-two buckets of L and S."""
    p = problem
    mask = "none" if not p.has_mask else "bool" if p.mask_is_bool else "float"
    structure = "+".join(sorted(p.features() - {"dense mask", "dropout"})) or "none"
    return (f"{p.dtype}/E{p.head_dim}/Ev{p.v_head_dim}/G{p.groups}/"
            f"{'causal' if p.causal_offset is not None else 'full'}/mask-{mask}/"
            f"dropout-{p.has_dropout}/structure-{structure}/L{_bucket(p.q_len)}/"
            f"S{_bucket(p.kv_len)}")


def choose(kernel, problem: Problem, pass_: str) -> tuning.Choice:
    """``kernel``'s configuration for ``pass_`` ('fwd' or 'bwd') of ``problem``."""
    return tuning.choose(kernel.NAME, pass_, problem_class(problem), kernel.Config,
                         default=functools.partial(kernel.default_config, problem, pass_),
                         candidates=functools.partial(kernel.candidates, problem, pass_),
                         measure=functools.partial(measure, kernel, problem, pass_))


def planned(name: str, problem: Problem, pass_: str):
    """The configuration of kernel ``name`` planned for ``problem`` (``select.with_configs``), or
    chosen now (a kernel called directly)."""
    from transformax.attention import select  # select imports this module
    return (problem.kernel_config(name, pass_)
            or choose(select.kernel(select.Backend(name)), problem, pass_).config)


def example_operands(problem: Problem):
    """Random q, k, v and extras: all-visible masks, zero captured arrays, a dropout seed."""
    p = problem
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), p.dtype)

    q = normal(p.batch, p.q_heads, p.q_len, p.head_dim)
    k = normal(p.batch, p.kv_heads, p.kv_len, p.head_dim)
    v = normal(p.batch, p.kv_heads, p.kv_len, p.v_head_dim)
    mask = None
    if p.has_mask:
        mask = jnp.ones(p.mask_shape, bool) if p.mask_is_bool else jnp.zeros(p.mask_shape, p.dtype)
    rows = lambda n, fill: jnp.full((n, p.q_len), fill, jnp.int32)
    zeros = lambda fn: tuple(jnp.zeros(v.aval.shape, v.aval.dtype) for v in fn.jaxpr.constvars)
    extras = Extras(
        mask=mask, seed=jnp.zeros((2,), jnp.uint32) if p.has_dropout else None,
        bounds=(rows(p.bounds, 0), rows(p.bounds, p.kv_len)) if p.bounds else (),
        segments=(rows(p.segments, 0), jnp.zeros((p.segments, p.kv_len), jnp.int32))
        if p.segments else (),
        mask_consts=zeros(p.mask_fn) if p.mask_fn else (),
        score_consts=zeros(p.score_fn) if p.score_fn else ())
    if p.table_blocks:  # every tile partial
        shape = (1, 1, *(-(-n // b) for n, b in zip((p.q_len, p.kv_len), p.table_blocks)))
        extras = extras._replace(table=jnp.ones(shape, jnp.int8))
    return q, k, v, extras


def measure(kernel, problem: Problem, pass_: str, config) -> float:
    """Median seconds of ``kernel``'s ``pass_`` with ``config`` on random operands of the
    problem's shape; eager, also when asked while a caller's function is being traced."""
    p = dataclasses.replace(problem, kernel_configs=(((kernel.NAME, pass_), config),))
    with jax.ensure_compile_time_eval():
        q, k, v, extras = example_operands(p)
        forward = jax.jit(functools.partial(kernel.forward, p))
        if pass_ == "fwd":
            return tuning.median_time(lambda: jax.block_until_ready(forward(q, k, v, extras)))
        out, lse = forward(q, k, v, extras)
        backward = jax.jit(functools.partial(kernel.backward, p))
        zero = jnp.zeros_like(lse)
        return tuning.median_time(lambda: jax.block_until_ready(
            backward(q, k, v, extras, out, lse, out, zero)))
