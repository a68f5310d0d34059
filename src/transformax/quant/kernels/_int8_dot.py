"""What the integer-product kernels share: eligibility and quantize -> dot -> rescale."""

from __future__ import annotations

from transformax.quant import activations
from transformax.quant.problem import Problem

GROUPED = "grouped weight scales (per-channel and per-tensor only)"


def reasons_unsupported(problem: Problem, *, activations_: str = "int8") -> list[str]:
    """Why a kernel for ``activations_`` ("int8": dynamic or static int8 activations, "float":
    weight-only, with grouped weights too; "any": either, per-channel / per-tensor weights)
    cannot run ``problem``."""
    reasons = []
    weight_only = problem.activations == "none"
    if activations_ == "int8" and weight_only:
        reasons.append("weight-only recipe: the activations are not int8")
    if activations_ == "float" and not weight_only:
        reasons.append("int8 activations: xla_int8 multiplies them in one pass")
    elif activations_ != "float" and problem.weight_granularity == "group":
        reasons.append(GROUPED)
    return reasons


def weight_reasons(problem: Problem) -> list[str]:
    """Why a kernel for per-channel / per-tensor int8 weights only cannot take ``problem``'s."""
    reasons = [GROUPED] if problem.weight_granularity == "group" else []
    if problem.bits == 4:
        reasons.append("packed int4 weights (int8 only)")
    return reasons


def matmul(dot, x, qw):
    """``rescale(dot(xq, values))`` for ``x`` quantized as ``qw`` asks."""
    xq, scale, zero = activations.quantize(x, qw)
    return activations.rescale(dot(xq, qw.values), scale, zero, qw)
