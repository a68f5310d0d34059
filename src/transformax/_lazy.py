"""Package attributes imported on first use (PEP 562), so that importing a package (and the
command-line entry points under it) stays light: JAX loads only when something needs it."""

from __future__ import annotations

import importlib


def attributes(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to the
    submodule that defines it (``".attention"``), or to itself for a submodule (``".nn"``)."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        return module if exports[name] == f".{name}" else getattr(module, name)

    return __getattr__
