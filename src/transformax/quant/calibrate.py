"""Calibration for static activation scales: run a function over batches with observing weights
in place of the layers' weights, and reduce what each layer saw to a scale (and zero point)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from transformax.quant.activations import scale_and_zero
from transformax.quant.layers import map_layers
from transformax.quant.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class Observer:
    """A float weight that records the range of what is multiplied by it (``x @ observer``),
    under ``jit`` too (through a host callback), then multiplies as the weight would."""

    w: jax.Array
    name: str
    record: Callable
    percentile: float | None

    __array_ufunc__ = None  # NumPy arrays defer ``x @ observer`` to ``__rmatmul__``

    def __rmatmul__(self, x):
        x32 = jnp.asarray(x, jnp.float32)
        if self.percentile is None:
            lo, hi = jnp.min(x32), jnp.max(x32)
        else:
            lo = jnp.percentile(x32, 100.0 - self.percentile)
            hi = jnp.percentile(x32, self.percentile)
        jax.debug.callback(self.record, self.name, lo, hi, ordered=True)
        return x @ self.w


jax.tree_util.register_dataclass(Observer, data_fields=["w"],
                                 meta_fields=["name", "record", "percentile"])


def calibrate(params, layers: list[str], calibration, recipe: Recipe) -> dict[str, tuple]:
    """``{layer path: (act_scale, act_zero or None)}`` for the ``layers`` (paths), from
    ``calibration = (fn, batches)``: ``fn(params, batch)`` called per batch."""
    if (not isinstance(calibration, tuple) or len(calibration) != 2
            or not callable(calibration[0])):
        raise TypeError(f"quantize: calibration must be a (fn, batches) pair, fn(params, batch) "
                        f"calling the model; got {type(calibration).__name__}")
    fn, batches = calibration
    if not isinstance(batches, Iterable):
        raise TypeError(f"quantize: calibration batches must be iterable, got "
                        f"{type(batches).__name__}")
    seen: dict[str, list] = {name: [] for name in layers}

    def record(name, lo, hi):
        seen[name].append((float(lo), float(hi)))

    percentile = recipe.percentile if recipe.observer == "percentile" else None

    def observe(name, node):
        if name not in seen:
            return node
        return {**node, "w": Observer(node["w"], name, record, percentile)}

    observed = map_layers(observe, params)
    for batch in batches:
        jax.block_until_ready(fn(observed, batch))
    jax.effects_barrier()
    missing = [name for name, stats in seen.items() if not stats]
    if missing:
        raise ValueError(f"quantize: calibration never ran layers {missing}: fn(params, batch) "
                         f"must call nn.linear on them (or skip them)")
    result = {}
    for name, stats in seen.items():
        lo, hi = np.array(stats).T
        lo, hi = (lo.min(), hi.max()) if percentile is None else (lo.mean(), hi.mean())
        result[name] = scale_and_zero(jnp.float32(lo), jnp.float32(hi), recipe.act_symmetric)
    return result

