"""Attention kernels and their registry.

A kernel is a module with (the ``Kernel`` protocol):
- ``NAME``: its ``tfx.Backend`` value; ``FEATURES``: the ``Problem.features()`` it handles
  (dense mask, dropout, key intervals, segment ids, mask_mod, score_mod); the selector rejects
  calls needing others;
- ``reasons_unsupported(problem, platform) -> list[str]``: why it cannot run these inputs
  there (empty: it can);
- ``forward(problem, q, k, v, extras) -> (out, lse)`` and
  ``backward(problem, q, k, v, extras, out, lse, dout, dlse) -> (dq, dk, dv, dconsts)`` on the
  canonical operands of ``transformax.attention.problem`` (``dconsts``: gradients of the
  score_mod's floating captured arrays, ``tile_math.differentiable_consts``);
- optionally a tunable configuration: ``Config``, ``default_config(problem, pass_)`` and
  ``candidates(problem, pass_)`` (see ``transformax.attention.tune``), ``temporary_bytes`` for
  ``explain``, and ``EXPORTABLE = False`` where ``jax.export`` cannot serialize it.
"""

from typing import Protocol

from transformax.attention.backends import (cpu_flash, cudnn, math, pallas_tpu, pallas_triton,
                                            xla_flash)


class Kernel(Protocol):
    NAME: str
    FEATURES: frozenset

    def reasons_unsupported(self, problem, platform: str) -> list[str]: ...
    def forward(self, problem, q, k, v, extras): ...
    def backward(self, problem, q, k, v, extras, out, lse, dout, dlse): ...


KERNELS: dict[str, Kernel] = {module.NAME: module for module in (
    math, xla_flash, cpu_flash, pallas_triton, pallas_tpu, cudnn)}
