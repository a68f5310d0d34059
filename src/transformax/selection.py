"""What the kernel selectors (``attention.select``, ``quant.select``) share: the context that
limits and orders an op's kernels (``tfx.sdpa_kernel``, ``quant.kernel``), the order in which a
platform's kernels are tried under it, and the verdicts ``explain`` returns."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import jax


class KernelContext:
    """The kernels of one op (members of ``kernels``, an enum) a caller allows, and whether
    their order replaces the platform's priority. Held in a JAX user context: part of jit's
    cache key, so a function jitted outside a block is traced again inside one. ``api``,
    ``arg`` and ``type_name`` word its errors: ``{api}: {arg} must be {type_name} values``."""

    def __init__(self, kernels: type[enum.Enum], api: str, arg: str, type_name: str):
        self.kernels, self.api, self.arg, self.type_name = kernels, api, arg, type_name
        self._value = jax.make_user_context(None)  # (allowed kernels, set_priority) or None

    @contextlib.contextmanager
    def limit(self, kernels: enum.Enum | str | Iterable, set_priority: bool) -> Iterator[None]:
        """Allows only ``kernels`` inside the block (in their order with ``set_priority``)."""
        if isinstance(kernels, (self.kernels, str)):
            kernels = [kernels]
        kernels = list(kernels)
        try:
            chosen = tuple(self.kernels(k) for k in kernels)
        except ValueError as err:
            raise ValueError(f"{self.api}: {self.arg} must be {self.type_name} values, one of "
                             f"{[k.value for k in self.kernels]}; got {kernels!r}") from err
        if not chosen:
            raise ValueError(f"{self.api}: {self.arg} is empty; name at least one "
                             f"{self.type_name}")
        with self._value((chosen, set_priority)):
            yield

    @property
    def caller_ordered(self) -> bool:
        """Whether the caller's order replaces the platform's priority."""
        return self._value.value is not None and self._value.value[1]

    def order(self, priority: Iterable) -> list[tuple[enum.Enum, bool]]:
        """Every kernel with whether it is allowed, in the order the selector tries them: the
        caller's order (``set_priority``) or ``priority``, then the rest."""
        context = self._value.value
        order = list(priority)
        if self.caller_ordered:
            order = list(context[0]) + [k for k in order if k not in context[0]]
        order += [k for k in self.kernels if k not in order]
        return [(k, context is None or k in context[0]) for k in order]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One kernel on one platform: allowed by the caller's context, chosen, why it cannot run.
    A selector's subclass names its context (``excluded_by``) and what a chosen kernel notes
    (``chosen_note``)."""

    platform: str
    kernel: enum.Enum
    allowed: bool
    reasons: tuple[str, ...]
    chosen: bool = False
    excluded_by: ClassVar[str] = "the kernel context"

    @property
    def eligible(self) -> bool:
        return self.allowed and not self.reasons

    def chosen_note(self) -> str:
        return ""

    def describe(self) -> str:
        if self.chosen:
            return "chosen" + self.chosen_note()
        if not self.allowed:
            return f"excluded by {self.excluded_by}"
        return "eligible" if self.eligible else "cannot run: " + "; ".join(self.reasons)


def listing(rows: Iterable[Verdict]) -> str:
    """One line per verdict: ``  kernel: description`` (for the error nothing can run)."""
    return "\n".join(f"  {v.kernel.value}: {v.describe()}" for v in rows)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What ``explain`` returns: the problem and a verdict per platform and kernel (a
    selector's subclass prints them as a table)."""

    problem: Any
    rows: tuple[Verdict, ...]

    def chosen(self, platform: str) -> enum.Enum | None:
        return next((v.kernel for v in self.rows if v.platform == platform and v.chosen), None)
