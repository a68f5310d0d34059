"""Autoregressive generation with a preallocated KV cache: one prefill of the (right-padded)
prompts, then a ``lax.while_loop`` of single-token decode steps, all in one jitted function.

Works with any decoder module exposing ``init_cache(cfg, batch, max_len)`` and
``apply_cached(params, tokens, cfg, cache, *, lengths=None)`` (``models.gpt``, ``models.llama``).
"""

from __future__ import annotations

import functools
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from transformax.models import _common


def sample(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Token ids ``(...)`` drawn from ``logits (..., V)``.

    ``temperature == 0``: greedy (argmax; ``rng`` unused). Otherwise logits are divided by
    ``temperature``, restricted to the ``top_k`` largest and to the smallest set whose
    probability reaches ``top_p`` (nucleus), and sampled with ``rng``.
    """
    _check_sampling(temperature, top_k, top_p, rng)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p, rng):
    if not 0 <= temperature < math.inf:  # also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and rng is None:
        raise ValueError(f"sampling with temperature={temperature} needs rng= (a PRNG key); "
                         f"use temperature=0 for greedy decoding")


def _check_lengths(lengths, b: int, t: int, *, traced: bool) -> None:
    """``lengths`` must be ``(B,)`` with values in ``[1, T]``: concrete values at once, traced
    ones (inside ``jit``) only with ``traced=True``, when the computation runs."""
    def report(bad, lo, hi):
        if bad:
            raise ValueError(f"lengths must be ({b},) with values in [1, {t}], got values in "
                             f"[{int(lo)}, {int(hi)}]")

    if np.shape(lengths) != (b,):
        raise ValueError(f"lengths must be ({b},) with values in [1, {t}], got shape "
                         f"{np.shape(lengths)}")
    if not isinstance(lengths, jax.core.Tracer):
        report(np.min(lengths) < 1 or np.max(lengths) > t, np.min(lengths), np.max(lengths))
    elif traced:
        lo, hi = jnp.min(lengths), jnp.max(lengths)
        _common.raise_when_run(report, (lo < 1) | (hi > t), lo, hi)


def generate(model, params, cfg, prompts: jax.Array, *, max_new_tokens: int,
             lengths: jax.Array | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None, eos_id: int | None = None,
             pad_id: int = 0, check_ids: bool = False) -> jax.Array:
    """``max_new_tokens`` new tokens ``(B, max_new_tokens)`` int32 continuing each prompt.

    ``model``: a decoder module (``models.gpt``, ``models.llama``); ``prompts (B, T)``: token ids,
    right-padded; ``lengths (B,)``: each row's prompt length (default ``T``). Rows decode at
    their own positions in one batch. After ``eos_id`` a row emits ``pad_id``; the loop stops
    early once every row has ended. Sampling as :func:`sample`; the same ``rng`` gives the same
    tokens. The cache holds ``T + max_new_tokens`` positions, which must fit the model.
    ``prompts`` must hold ids in ``[0, cfg.vocab_size)``, padding too: checked at once when
    concrete; traced (``generate`` inside ``jit``) only with ``check_ids=True``, raising when
    the computation runs.
    """
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer) or 0 in prompts.shape:
        raise ValueError(f"prompts must be a non-empty integer (B, T) array, got shape "
                         f"{prompts.shape} dtype {prompts.dtype}")
    _common.check_token_ids(prompts, cfg.vocab_size, "prompts", traced=check_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, t = prompts.shape
    lengths = np.full((b,), t, np.int32) if lengths is None else lengths
    _check_lengths(lengths, b, t, traced=check_ids)
    _check_sampling(temperature, top_k, top_p, rng)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    return _generate(model, params, cfg, prompts.astype(jnp.int32),
                     jnp.asarray(lengths, jnp.int32), rng, eos, jnp.int32(pad_id),
                     max_new_tokens=max_new_tokens, sampling=(float(temperature), top_k, top_p))


@functools.partial(jax.jit, static_argnames=("model", "cfg", "max_new_tokens", "sampling"))
def _generate(model, params, cfg, prompts, lengths, rng, eos_id, pad_id, *, max_new_tokens,
              sampling):
    temperature, top_k, top_p = sampling
    b, t = prompts.shape

    def pick(logits, step):
        key = None if rng is None else jax.random.fold_in(rng, step)
        return sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)

    def ended(tokens):  # eos_id == -1: no end token
        return tokens == eos_id

    cache = model.init_cache(cfg, b, t + max_new_tokens)
    logits, cache = model.apply_cached(params, prompts, cfg, cache, lengths=lengths)
    first = pick(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], 0)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, cache, out, done = carry
        fed = jnp.where(done, 0, tokens)  # ended rows (holding pad_id) feed a valid dummy id
        logits, cache = model.apply_cached(params, fed[:, None], cfg, cache)
        tokens = jnp.where(done, pad_id, pick(logits[:, 0], step))
        out = jax.lax.dynamic_update_slice_in_dim(out, tokens[:, None], step, axis=1)
        return step + 1, tokens, cache, out, done | ended(tokens)

    return jax.lax.while_loop(cond, body, (1, first, cache, out, ended(first)))[3]


class _CallableModule(types.ModuleType):
    """``transformax.generate(...)`` is :func:`generate` (the module is also callable)."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
