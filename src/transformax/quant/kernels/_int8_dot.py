"""What the integer-product kernels share: eligibility and quantize -> dot -> rescale."""

from __future__ import annotations

from transformax.quant import activations
from transformax.quant.problem import Problem


def reasons_unsupported(problem: Problem) -> list[str]:
    reasons = []
    if problem.activations == "none":
        reasons.append("weight-only recipe: the activations are not int8")
    if problem.weight_granularity == "group":
        reasons.append("grouped weight scales (per-channel and per-tensor only)")
    return reasons


def matmul(dot, x, qw):
    """``rescale(dot(xq, values))`` for ``x`` quantized as ``qw`` asks."""
    xq, scale, zero = activations.quantize(x, qw)
    return activations.rescale(dot(xq, qw.values), scale, zero, qw)
