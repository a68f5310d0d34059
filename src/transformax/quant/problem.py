"""The canonical int8 matmul problem the selector and the kernels see."""

from __future__ import annotations

import dataclasses

import jax

from transformax.quant.qweight import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Problem:
    """``(M, K) @ (K, N)``: activations of ``dtype``, the weight's layout and activation mode."""

    name: str
    m: int
    k: int
    n: int
    dtype: str
    activations: str
    weight_granularity: str
    act_granularity: str
    act_symmetric: bool
    bits: int = 8
    groups: int = 1

    @classmethod
    def of(cls, x: jax.Array, qw: QuantizedWeight) -> Problem:
        """The problem of ``x (M, K) @ qw``."""
        return cls(qw.name, x.shape[0], *qw.shape, str(x.dtype), qw.activations,
                   qw.granularity, qw.act_granularity, qw.act_symmetric, qw.bits, qw.groups)

    def describe(self) -> str:
        acts = "float" if self.activations == "none" else (
            f"int8 {self.activations} per {self.act_granularity} "
            f"{'symmetric' if self.act_symmetric else 'asymmetric'}")
        return (f"int{self.bits} matmul {self.name!r}: ({self.m}, {self.k}) @ ({self.k}, "
                f"{self.n}), x {self.dtype}, weights per {self.weight_granularity}"
                f"{f' ({self.groups} groups)' if self.groups > 1 else ''}, activations {acts}")
