"""Pinned kernel tiles for tests: small tiles make small shapes cover several (and ragged)
tiles of the flash kernels."""

import contextlib

from transformax import host, tuning
from transformax.attention.backends import cpu_flash, xla_flash

ISAS = [isa for isa in ("avx2", "avx512") if isa in ("avx2", host.current().isa)]


def pinned_tiles(fwd: tuple[int, int], bwd: tuple[int, int], isa: str = "avx2", threads: int = 2):
    """A context pinning the flash kernels' tiles (and cpu_flash's ISA and threads)."""
    stack = contextlib.ExitStack()
    for pass_, (bq, bk) in (("fwd", fwd), ("bwd", bwd)):
        stack.enter_context(tuning.kernel_config("xla_flash", xla_flash.Config(bq, bk), pass_=pass_))
        stack.enter_context(tuning.kernel_config(
            "cpu_flash", cpu_flash.Config(bq, bk, threads, isa), pass_=pass_))
    return stack
