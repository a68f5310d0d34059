"""Checks and helpers the model modules share."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def num_params(params) -> int:
    """Number of scalars in a parameter pytree (a tied embedding counts once)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def check_tokens(tokens: jax.Array, cfg) -> None:
    """``tokens`` must be integer ``(B, T)`` with ``T <= cfg.max_len``."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer (B, T) array, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if tokens.shape[1] > cfg.max_len:
        raise ValueError(f"tokens has length {tokens.shape[1]}, more than the model's "
                         f"{cfg.max_len_field}={cfg.max_len}")


def check_token_ids(tokens, vocab_size: int, name: str = "tokens", *,
                    traced: bool = False) -> None:
    """Raise naming the first id of ``tokens`` outside ``[0, vocab_size)``, its index and the
    vocabulary. Concrete ``tokens`` are checked at once; traced ones (inside ``jit``) only with
    ``traced=True`` (see :func:`raise_when_run`). Unchecked, an id ``>= vocab_size`` embeds
    as NaN and a negative one wraps round (JAX's out-of-bounds gather)."""
    if not isinstance(tokens, jax.core.Tracer):
        tokens = np.asarray(tokens)
        bad = (tokens < 0) | (tokens >= vocab_size)
        if bad.any():
            where = np.argwhere(bad)[0]
            _raise_outside(name, vocab_size, True, where, tokens[tuple(where)])
    elif traced and tokens.size:
        bad = (tokens < 0) | (tokens >= vocab_size)
        first = jnp.argmax(bad.reshape(-1))
        raise_when_run(functools.partial(_raise_outside, name, vocab_size), bad.any(),
                       jnp.stack(jnp.unravel_index(first, tokens.shape)),
                       tokens.reshape(-1)[first])


def check_cache_room(pos, t: int, limit: int, name: str, *, traced: bool = False) -> None:
    """Raise when ``t`` more tokens do not fit after ``pos (B,)`` in ``limit`` positions:
    concrete ``pos`` at once, traced only with ``traced=True`` (see :func:`raise_when_run`).
    Unchecked under ``jit``, the write is clamped into the cache and the logits are wrong."""
    if not isinstance(pos, jax.core.Tracer):
        _raise_no_room(t, name, limit, int(np.max(pos)) + t > limit, int(np.max(pos)))
    elif traced:
        most = jnp.max(pos)
        raise_when_run(functools.partial(_raise_no_room, t, name, limit), most + t > limit,
                       most)


def raise_when_run(report, failed: jax.Array, *operands) -> None:
    """Inside ``jit``: call ``report(failed, *operands)`` on the host, only when ``failed``,
    so that it raises when the computation runs (``jit`` reports a ``JaxRuntimeError`` holding
    the message). Under ``vmap`` ``failed`` is per row, so every row is checked."""
    callback = functools.partial(jax.debug.callback, report)
    jax.lax.cond(failed, callback, lambda *_: None, failed, *operands)


def _raise_outside(name: str, vocab_size: int, bad, where, value) -> None:
    if bad:
        raise ValueError(f"{name}: token id {int(value)} at index "
                         f"{tuple(int(i) for i in where)} is outside the model's vocabulary "
                         f"[0, {vocab_size})")


def _raise_no_room(t: int, name: str, limit: int, full, held) -> None:
    if full:
        raise ValueError(f"{t} tokens do not fit the cache: a row already holds {int(held)} of "
                         f"its {name}={limit} positions")


def check_same_shape(name: str, array: jax.Array, tokens: jax.Array) -> None:
    """A per-token input (``attention_mask``, ``document_ids``) must have the tokens' shape."""
    if array.shape != tokens.shape:
        raise ValueError(f"{name} must have the tokens' shape {tokens.shape}, got "
                         f"{array.shape}")


def dropout_keys(rng: jax.Array | None, rate: float, n: int) -> list:
    """``n`` dropout keys from ``rng``; ``None``s when ``rate == 0`` (evaluation)."""
    if rate == 0.0:
        return [None] * n
    if rng is None:
        raise ValueError(f"train=True with dropout={rate} needs rng= (a PRNG key), got None")
    return list(jax.random.split(rng, n))
