"""The pure train step ``(state, batch) -> (state, metrics)`` and the evaluation step."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

# loss_fn(params, micro_batch, rng_or_None) -> (sum of token losses, token count)
LossFn = Callable[[Any, dict, "jax.Array | None"], tuple[jax.Array, jax.Array]]


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; what a checkpoint holds)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw PRNG key; step s uses fold_in(rng, s) for dropout


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))


def step_rng(state: TrainState) -> jax.Array:
    """The dropout key of the step ``state`` is about to take: a function of (seed, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def accumulate(loss_fn: LossFn, params, batch: dict, rng: jax.Array):
    """Gradient of the mean token loss over ``batch`` (leading axis: micro-batches, summed in a
    scan so only one micro-batch's activations live at a time). Returns ``(loss, grads)``."""
    def micro(i, b):
        def summed(p):
            total, count = loss_fn(p, b, jax.random.fold_in(rng, i))
            return total, (total, count)

        grads, (total, count) = jax.grad(summed, has_aux=True)(params)
        return grads, total, count

    n = jax.tree.leaves(batch)[0].shape[0]
    if n == 1:
        grads, total, count = micro(0, jax.tree.map(lambda x: x[0], batch))
    else:
        def body(carry, xs):
            g, t, c = micro(*xs)
            return jax.tree.map(jnp.add, carry, (g, t, c)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
        (grads, total, count), _ = jax.lax.scan(body, zeros, (jnp.arange(n), batch))
    count = jnp.maximum(count, 1.0)
    return total / count, jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule):
    """``train_step(state, batch) -> (state, metrics)`` with metrics ``loss`` (before the
    update), ``grad_norm`` (before clipping) and ``lr`` (the rate this step used)."""

    def train_step(state: TrainState, batch: dict):
        loss, grads = accumulate(loss_fn, state.params, batch, step_rng(state))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(lr_schedule(state.step), jnp.float32)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def make_eval_step(loss_fn: LossFn):
    """``eval_step(params, batch) -> (sum of token losses, token count)`` over all micro-batches,
    without dropout."""

    def eval_step(params, batch: dict):
        def one(b):
            return loss_fn(params, b, None)
        totals, counts = jax.lax.map(one, batch)
        return totals.sum(), counts.sum()

    return eval_step

