"""transformax's native CPU extensions (XLA FFI handlers that the ordinary install builds from
``csrc/`` on x86-64): loading one and registering its handlers, and why a kernel that needs one
cannot run."""

from __future__ import annotations

import dataclasses
import importlib
import types

import jax

from transformax import host


@dataclasses.dataclass(frozen=True)
class Extension:
    """An extension module, or None with the reason it did not import."""

    module: types.ModuleType | None
    error: str = ""

    def reasons_unsupported(self, isas) -> list[str]:
        """Why its kernels cannot run here: not built, or a host ISA not in ``isas``."""
        if self.module is None:
            return [f"the native extension is not built ({self.error})"]
        if host.current().isa not in isas:
            return ["this CPU lacks AVX2+FMA"]
        return []


def load(name: str, targets: dict[str, str]) -> Extension:
    """``transformax.<name>`` with each of its handler capsules registered for cpu as an FFI
    target (``{target: capsule attribute}``)."""
    try:
        module = importlib.import_module(f"transformax.{name}")
    except ImportError as err:  # not built (not x86-64, or no compiler at install time)
        return Extension(None, str(err))
    for target, attribute in targets.items():
        jax.ffi.register_ffi_target(target, getattr(module, attribute), platform="cpu")
    return Extension(module)
