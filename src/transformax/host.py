"""The host transformax runs on: CPU model, ISA, cache sizes, cores and library versions.

Kernel configurations are derived from it (cold-cache defaults) and keyed by it (the tuning
cache), and every benchmark records it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import re

_CACHE_SYSFS = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw",
              "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
              "amx_int8")


@dataclasses.dataclass(frozen=True)
class Host:
    """What a kernel configuration depends on. Cache sizes are per core, in bytes."""

    cpu: str
    isa_flags: tuple[str, ...]
    l1d: int
    l2: int
    l3: int
    cores: int
    versions: tuple[tuple[str, str], ...]

    @property
    def isa(self) -> str:
        """The widest vector ISA kernels may use: 'avx512', 'avx2' or 'none'. XLA's
        ``--xla_cpu_max_isa`` and ``TRANSFORMAX_CPU_ISA`` lower it (to emulate another host)."""
        flags = set(self.isa_flags)
        best = ("avx512" if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags else
                "avx2" if {"avx2", "fma"} <= flags else "none")
        for cap in (_xla_max_isa(), os.environ.get("TRANSFORMAX_CPU_ISA", "").lower() or None):
            if cap is not None and _ISA_ORDER.index(cap) < _ISA_ORDER.index(best):
                best = cap
        return best

    def fingerprint(self) -> str:
        """A short hash of everything here and the effective ISA: the tuning cache's key."""
        blob = json.dumps([dataclasses.asdict(self), self.isa], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        versions = ", ".join(f"{name} {v}" for name, v in self.versions)
        return (f"{self.cpu}; {self.cores} cores; ISA {self.isa} ({' '.join(self.isa_flags)}); "
                f"L1d {self.l1d // 1024} KiB, L2 {self.l2 // 1024} KiB, L3 {self.l3 // 2**20} MiB"
                f" per core/shared; {versions}")

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "isa": self.isa, "fingerprint": self.fingerprint()}


_ISA_ORDER = ("none", "avx2", "avx512")


def _xla_max_isa() -> str | None:
    match = re.search(r"--xla_cpu_max_isa=(\w+)", os.environ.get("XLA_FLAGS", ""))
    if not match:
        return None
    value = match.group(1).upper()
    return "avx512" if value.startswith("AVX512") else "avx2" if value == "AVX2" else "none"


def _cache_size(level: int, default: int) -> int:
    for index in sorted(_CACHE_SYSFS.glob("index*")):
        try:
            if (int((index / "level").read_text()) == level
                    and (index / "type").read_text().strip() in ("Data", "Unified")):
                return _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
    return default


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text, re.IGNORECASE)
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    if found := re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
        model = found.group(1).strip()
    if found := re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE):
        flags = set(found.group(1).split())
    return model, flags


def _versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata
    found = []
    for name in ("jax", "jaxlib", "torch"):
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(found)


@functools.lru_cache(maxsize=1)
def current() -> Host:
    """This host (read once per process: the hardware does not change under it)."""
    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Host(cpu=model, isa_flags=tuple(f for f in _ISA_FLAGS if f in flags),
                l1d=_cache_size(1, 32 * 2**10), l2=_cache_size(2, 512 * 2**10),
                l3=_cache_size(3, 16 * 2**20), cores=cores or 1, versions=_versions())
