"""Finding ``nn.linear`` layers in any parameter pytree, by dotted path (``blocks.0.mlp.fc``;
``<root>`` for a bare layer)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from transformax.quant.qweight import QuantizedTable


def is_layer(node) -> bool:
    """An ``nn.linear`` layer: a dict with a ``"w"`` and at most a ``"b"`` besides."""
    return isinstance(node, dict) and "w" in node and set(node) <= {"w", "b"}


def _map(fn: Callable, params, layers: bool):
    def visit(path, node):
        if is_layer(node) != layers:
            return node
        return fn(jax.tree_util.keystr(path, simple=True, separator=".") or "<root>", node)

    return jax.tree_util.tree_map_with_path(
        visit, params, is_leaf=lambda n: is_layer(n) or isinstance(n, QuantizedTable))


def map_layers(fn: Callable[[str, dict], dict], params):
    """``params`` with each layer dict replaced by ``fn(path, layer)``."""
    return _map(fn, params, layers=True)


def map_arrays(fn: Callable[[str, object], object], params):
    """``params`` with each leaf outside the layers (e.g. an embedding table) replaced by
    ``fn(path, leaf)``."""
    return _map(fn, params, layers=False)


def find_layers(params) -> dict[str, dict]:
    """Every layer in ``params`` by path, in pytree order."""
    found = {}
    map_layers(lambda path, node: found.setdefault(path, node), params)
    return found
