"""Quantization recipes: the knobs as a :class:`Recipe` and the named presets."""

from __future__ import annotations

import dataclasses

ACTIVATIONS = ("none", "dynamic", "static")
BITS = (8, 4)
WEIGHT_GRANULARITIES = ("channel", "tensor", "group")
ACT_GRANULARITIES = ("token", "tensor")
OBSERVERS = ("minmax", "percentile")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Recipe {name}={value!r}: expected one of {choices}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """How to quantize: int8 (or, weight-only, ``bits=4``: packed int4) weights, symmetric,
    scaled per output channel / tensor / group of ``group_size`` input rows; activations kept
    in the compute dtype (``"none"``), quantized to int8 at run time (``"dynamic"``, per token
    or per tensor) or with scales fixed by calibration (``"static"``, per tensor; ``observer``
    "minmax" or "percentile", the ``percentile`` of the batch's values, averaged over batches).
    ``act_symmetric=False`` adds a zero point. ``layers``: glob patterns over layer paths
    (e.g. ``"blocks.*.mlp.*"``). ``embeddings``: glob patterns naming embedding tables to
    quantize too, per row (e.g. ``("wte",)``, GPT-2's token embedding, which is also its tied
    output head)."""

    activations: str = "none"
    bits: int = 8
    weight_granularity: str = "channel"
    group_size: int = 128
    act_granularity: str | None = None
    act_symmetric: bool = True
    observer: str = "minmax"
    percentile: float = 99.99
    layers: tuple[str, ...] = ("*",)
    embeddings: tuple[str, ...] = ()

    def __post_init__(self):
        _check_choice("activations", self.activations, ACTIVATIONS)
        _check_choice("bits", self.bits, BITS)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        if self.bits == 4 and self.activations != "none":
            raise ValueError(f"Recipe bits=4: int4 weights are weight-only (activations='none'), "
                             f"got activations={self.activations!r}")
        _check_choice("observer", self.observer, OBSERVERS)
        if self.act_granularity is None:
            object.__setattr__(self, "act_granularity",
                               "tensor" if self.activations == "static" else "token")
        _check_choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)
        if self.activations == "static" and self.act_granularity != "tensor":
            raise ValueError("Recipe act_granularity='token' needs activations='dynamic' "
                             "(static activation scales are per tensor)")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"Recipe group_size={self.group_size!r}: expected a positive int")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"Recipe percentile={self.percentile!r}: expected a value in "
                             f"(50, 100]")
        for name in ("layers", "embeddings"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"Recipe {name}={value!r}: expected a tuple of glob patterns")
        if self.embeddings and self.bits == 4:
            raise ValueError("Recipe embeddings: quantized embedding tables are int8 "
                             "(bits=8), not int4")
        if self.embeddings and self.activations == "static":
            raise ValueError("Recipe embeddings: quantized embedding tables support "
                             "activations 'none' and 'dynamic', not 'static'")


RECIPES = {
    "int8-weight": Recipe(),
    "int8-dynamic": Recipe(activations="dynamic"),
    "int8-static": Recipe(activations="static"),
    "int4-weight": Recipe(bits=4, weight_granularity="group"),
}


def as_recipe(recipe: str | Recipe) -> Recipe:
    """``recipe`` as a :class:`Recipe` (a name from ``RECIPES`` or a ``Recipe``)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in RECIPES:
        return RECIPES[recipe]
    raise ValueError(f"quantize: unknown recipe {recipe!r}; expected one of {list(RECIPES)} "
                     f"or a quant.Recipe")
