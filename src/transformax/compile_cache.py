"""JAX's persistent compilation cache for the command lines: a second run of the same config
loads its compiled programs from disk instead of compiling them again."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TRANSFORMAX_CACHE_DIR"
DEFAULT = Path("~/.cache/transformax/jax")


def enable(enabled: bool = True) -> Path | None:
    """Cache compiled programs under ``$TRANSFORMAX_CACHE_DIR`` (default
    ``~/.cache/transformax/jax``); returns the folder, or ``None`` when ``enabled`` is False or
    the variable is set to the empty string."""
    folder = os.environ.get(ENV, str(DEFAULT))
    if not enabled or not folder:
        return None
    import jax

    path = Path(folder).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
