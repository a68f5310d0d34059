"""Measured kernel choice: of the kernels that can run a problem, the one timed fastest on this
host for its problem class, through ``transformax.tuning`` (pinned with
``tuning.kernel_config(NAME, Pick(...))``, cached per host, or tuned when autotuning is on);
without a measurement, the platform's static priority decides."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformax import host, tuning
from transformax.quant.kernels import cpu_int8
from transformax.quant.problem import Problem
from transformax.quant.qweight import INT4_MAX, INT8_MAX, QuantizedWeight, pack_int4

NAME = "quant_matmul"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_ROWS = 512
NATIVE = ("cpu_int8", "cpu_int4")


@dataclasses.dataclass(frozen=True)
class Pick:
    """The tuned "configuration": which kernel."""

    kernel: str


def problem_class(p: Problem) -> str:
    """What a choice is keyed by (besides host): dtype, recipe layout, K, N and M's power-of-two
    bucket."""
    m = min(1 << max(p.m - 1, 0).bit_length(), 4096)
    return (f"{p.dtype}/int{p.bits}/{p.activations}/{p.weight_granularity}{p.groups}/"
            f"{p.act_granularity}/"
            f"{'sym' if p.act_symmetric else 'asym'}/M{m}/K{p.k}/N{p.n}")


def choose(problem: Problem, eligible: list, module) -> tuning.Choice:
    """The kernel (a :class:`Pick`) for ``problem`` among ``eligible`` (in priority order) and
    where the choice comes from; ``module(kernel)`` is its implementation."""
    choice = tuning.choose(NAME, "fwd", problem_class(problem), Pick, default=lambda: None,
                           candidates=lambda: [Pick(k.value) for k in eligible],
                           measure=lambda pick: measure(problem, module(pick.kernel)))
    return default_choice(problem, eligible) if choice.config is None else choice


def default_choice(problem: Problem, eligible: list) -> tuning.Choice:
    """Unmeasured: the first eligible kernel ("priority"), with two host defaults. A native
    kernel (``cpu_int8``, ``cpu_int4``) runs up to its measured crossover
    (``cpu_int8.row_limit``), the next kernel beyond. A weight-only product of more than
    ``BF16_MIN_ROWS`` rows on an AVX-512 host with bf16 instructions (not an emulated AVX2
    one) runs ``xla_bf16`` (measured on Sapphire Rapids at 1024 rows: 2.1x faster than
    float32, 1.7x than ``xla_int8x2``)."""
    names, machine = [k.value for k in eligible], host.current()
    if (problem.activations == "none" and problem.m > BF16_MIN_ROWS and "xla_bf16" in names
            and machine.isa == "avx512" and set(BF16_FLAGS) & set(machine.isa_flags)):
        return tuning.Choice(Pick("xla_bf16"), f"host default: weight-only, more than "
                                               f"{BF16_MIN_ROWS} rows, bf16 instructions")
    if names[0] in NATIVE:
        limit, why = cpu_int8.row_limit(problem)
        if problem.m <= limit:
            return tuning.Choice(Pick(names[0]), f"host default: up to {limit} rows {why}")
        return tuning.Choice(Pick(names[1]), f"host default: {problem.m} rows, {names[0]} "
                                             f"runs up to {limit} {why}")
    return tuning.Choice(Pick(names[0]), "priority")


def example_operands(p: Problem):
    """Random ``x (M, K)`` and a random per-channel / per-tensor quantized weight of the
    problem's layout (static: activation scale 1/127, zero point 0 when asymmetric)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((p.m, p.k)), p.dtype)
    qmax = INT4_MAX if p.bits == 4 else INT8_MAX
    values = jnp.asarray(rng.integers(-qmax, qmax + 1, (p.k, p.n)), jnp.int8)
    scale = jnp.full((p.groups, 1 if p.weight_granularity == "tensor" else p.n), 0.01,
                     jnp.float32)
    static = p.activations == "static"
    qw = QuantizedWeight(pack_int4(values) if p.bits == 4 else values, scale,
                         act_scale=jnp.float32(1 / 127) if static else None,
                         act_zero=jnp.int32(0) if static and not p.act_symmetric else None,
                         name=p.name, activations=p.activations,
                         act_granularity=p.act_granularity, act_symmetric=p.act_symmetric,
                         bits=p.bits)
    return x, qw


def measure(problem: Problem, kernel_module) -> float:
    """Median seconds of one kernel on the problem; eager, also while a caller is tracing."""
    with jax.ensure_compile_time_eval():
        x, qw = example_operands(problem)
        run = jax.jit(functools.partial(kernel_module.matmul, problem))
        return tuning.median_time(lambda: jax.block_until_ready(run(x, qw)))
