"""Kernel configurations: pinned by the caller, read from the on-disk tuning cache, tuned by
timing candidates, or derived from the host (in that order).

The cache is one JSON file per host fingerprint under ``$TRANSFORMAX_CACHE_DIR`` (default
``~/.cache/transformax``). A corrupt file or one written on another host is ignored with a
warning. Tuning runs on first use of a problem class when ``TRANSFORMAX_AUTOTUNE=1``, or on demand
through ``tfx.autotune``; otherwise an unseen class gets the host-derived default, so results and
compile times stay deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from transformax import host

_FORMAT = 1
# Pinned configs, ((kernel/pass, config), ...), and whether to tune now: JAX user contexts, so
# they are part of jit's cache key (a function jitted outside a block is traced again inside).
_pinned = jax.make_user_context(())
_tune_now = jax.make_user_context(False)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A kernel configuration and where it came from: pinned, cache, tuned or default."""

    config: Any
    source: str

    def describe(self) -> str:
        return f"{self.config} ({self.source})"


@contextlib.contextmanager
def kernel_config(kernel: str, config: Any, *, pass_: str | None = None) -> Iterator[None]:
    """Pins ``config`` for ``kernel`` (both passes, or only ``pass_`` = 'fwd' / 'bwd') inside the
    block, for calls traced there. Part of the kernel-selection context, like ``sdpa_kernel``."""
    kernel = getattr(kernel, "value", kernel)
    passes = ("fwd", "bwd") if pass_ is None else (pass_,)
    if not set(passes) <= {"fwd", "bwd"}:
        raise ValueError(f"kernel_config: pass_ must be 'fwd', 'bwd' or None; got {pass_!r}")
    pins = {**dict(_pinned.value), **{f"{kernel}/{p}": config for p in passes}}
    with _pinned(tuple(sorted(pins.items(), key=lambda item: item[0]))):
        yield


@contextlib.contextmanager
def autotuning() -> Iterator[None]:
    """Tunes (and caches) every problem class traced inside the block that the cache lacks."""
    with _tune_now(True):
        yield


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TRANSFORMAX_CACHE_DIR")
                        or pathlib.Path.home() / ".cache" / "transformax")


def cache_file() -> pathlib.Path:
    return cache_dir() / f"tuning-{host.current().fingerprint()}.json"


def load_cache() -> dict[str, dict]:
    """This host's cached winners, ``{key: config fields}``; {} when absent, corrupt or foreign."""
    path = cache_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"transformax: ignoring the unreadable tuning cache {path}: {err}",
                      stacklevel=2)
        return {}
    fingerprint = host.current().fingerprint()
    if (not isinstance(data, dict) or data.get("format") != _FORMAT
            or not isinstance(data.get("entries"), dict)):
        warnings.warn(f"transformax: ignoring the tuning cache {path}: not a format-{_FORMAT} "
                      f"cache file", stacklevel=2)
        return {}
    if data.get("host", {}).get("fingerprint") != fingerprint:
        warnings.warn(f"transformax: ignoring the tuning cache {path}: written on another host "
                      f"({data.get('host', {}).get('cpu', 'unknown')})", stacklevel=2)
        return {}
    return data["entries"]


def store(key: str, config: Any) -> None:
    """Adds ``key -> config`` to this host's cache file (written atomically)."""
    entries = load_cache()
    entries[key] = dataclasses.asdict(config)
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"format": _FORMAT, "host": host.current().as_json(), "entries": entries},
                      indent=1, sort_keys=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(blob)
    os.replace(f.name, path)


def median_time(run: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``run()`` (blocking) after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(kernel: str, pass_: str, problem_class: str, config_type: type,
           default: Callable[[], Any], candidates: Callable[[], Sequence[Any]],
           measure: Callable[[Any], float]) -> Choice:
    """The configuration of ``kernel``'s ``pass_`` for ``problem_class``: pinned, cached, tuned
    (when autotuning is on), else ``default()``."""
    pinned = dict(_pinned.value).get(f"{kernel}/{pass_}")
    if pinned is not None:
        return Choice(pinned, "pinned")
    key = f"{kernel}/{pass_}/{problem_class}"
    cached = load_cache().get(key)
    if cached is not None:
        try:
            return Choice(config_type(**cached), "cache")
        except TypeError:
            warnings.warn(f"transformax: ignoring the tuning cache entry {key}: {cached}",
                          stacklevel=2)
    if _tune_now.value or os.environ.get("TRANSFORMAX_AUTOTUNE") == "1":
        best = min(candidates(), key=measure)
        store(key, best)
        return Choice(best, "tuned")
    return Choice(default(), "default")
