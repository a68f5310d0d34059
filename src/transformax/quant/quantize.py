"""``quantize`` / ``dequantize`` of every ``nn.linear`` layer in a parameter pytree."""

from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp

from transformax.quant.calibrate import calibrate
from transformax.quant.layers import find_layers, map_arrays, map_layers
from transformax.quant.qweight import QuantizedTable, QuantizedWeight, quantize_weight
from transformax.quant.recipe import Recipe, as_recipe


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _patterns(arg: str, patterns, paths: list[str], what: str = "linear layer") -> tuple:
    """Glob ``patterns`` (checked: strings, each matching one of ``paths``)."""
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"quantize: {arg} must be a sequence of glob patterns over {what} paths "
                        f"(e.g. ['blocks.0.*']), got {patterns!r}")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise ValueError(f"quantize: {arg} pattern {pattern!r} matches no {what}; the "
                             f"candidates are: {shown}")
    return tuple(patterns)


def _selected(paths: list[str], recipe: Recipe, skip) -> list[str]:
    include = _patterns("Recipe layers", recipe.layers, paths)
    exclude = _patterns("skip", skip, paths)
    return [p for p in paths if _matches(p, include) and not _matches(p, exclude)]


def _check_weight(name: str, w, what: str = "layer", layout: str = "(in, out) weight") -> None:
    if isinstance(w, (QuantizedWeight, QuantizedTable)):
        raise ValueError(f"quantize: {what} {name!r} is already quantized")
    if getattr(w, "ndim", None) != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize: {what} {name!r}: int8 needs a floating-point 2-D {layout}, "
                         f"got shape {getattr(w, 'shape', None)} dtype "
                         f"{getattr(w, 'dtype', type(w).__name__)}")


def quantize(params, recipe: str | Recipe, *, calibration=None, skip=()):
    """``params`` with the weight of every ``nn.linear`` layer (a ``{"w"[, "b"]}`` dict) whose
    dotted path matches ``recipe.layers`` and no ``skip`` glob replaced by a
    :class:`QuantizedWeight`. ``recipe``: "int8-weight", "int8-dynamic", "int8-static",
    "int4-weight" (groups of 128 input rows, two values a byte) or a :class:`Recipe`.
    "int8-static" needs ``calibration=(fn, batches)``: ``fn(params, batch)`` runs the model;
    the layers' input ranges over the batches fix the activation scales.
    Embedding tables named by ``recipe.embeddings`` become :class:`QuantizedTable` s."""
    recipe = as_recipe(recipe)
    layers = find_layers(params)
    if not layers:
        raise ValueError("quantize: params has no nn.linear layers ({'w': (in, out)[, 'b']} "
                         "dicts)")
    chosen = _selected(list(layers), recipe, skip)
    for name in chosen:
        _check_weight(name, layers[name]["w"])
    if (recipe.activations == "static") != (calibration is not None):
        raise ValueError(f"quantize: calibration=(fn, batches) is needed by, and only by, "
                         f"activations='static' (recipe activations={recipe.activations!r})")
    static = calibrate(params, chosen, calibration, recipe) if calibration is not None else {}

    def convert(name, layer):
        if name not in chosen:
            return layer
        w = layer["w"]
        act_scale, act_zero = static.get(name, (None, None))
        qw = QuantizedWeight(**quantize_weight(w, granularity=recipe.weight_granularity,
                                               group_size=recipe.group_size, name=name,
                                               bits=recipe.bits),
                             act_scale=act_scale, act_zero=act_zero, name=name,
                             activations=recipe.activations,
                             act_granularity=recipe.act_granularity,
                             act_symmetric=recipe.act_symmetric, dtype=str(w.dtype),
                             bits=recipe.bits)
        return {**layer, "w": qw}

    return _quantize_tables(map_layers(convert, params), recipe)


def _quantize_tables(params, recipe: Recipe):
    """``params`` with the tables ``recipe.embeddings`` names quantized per row."""
    if not recipe.embeddings:
        return params
    paths = []  # the candidates: 2-D arrays and quantized tables outside the layers
    map_arrays(lambda name, leaf: (isinstance(leaf, QuantizedTable) or getattr(leaf, "ndim", 0)
                                   == 2) and paths.append(name), params)
    patterns = _patterns("Recipe embeddings", recipe.embeddings, paths, "embedding table")

    def convert(name, table):
        if not _matches(name, patterns):
            return table
        _check_weight(name, table, "embedding table", "(num, dim) table")
        q = quantize_weight(table.T, granularity="channel", group_size=1, name=name)
        return QuantizedTable(q["values"], q["scale"], name=name,
                              activations=recipe.activations,
                              act_granularity=recipe.act_granularity,
                              act_symmetric=recipe.act_symmetric, dtype=str(table.dtype))

    return map_arrays(convert, params)


def dequantize(params):
    """``params`` with every quantized weight and table replaced by its float array."""
    quantized = (QuantizedWeight, QuantizedTable)
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, quantized) else x,
                        params, is_leaf=lambda x: isinstance(x, quantized))
