"""Parameter roles: what each parameter an ``nn`` layer creates is, read from its path, so that
training decides sharding and weight decay without knowing a model's names."""

from __future__ import annotations

from transformax.nn import mha, mlp
from transformax.nn.linear import EMBEDDING, IN_PROJ, OUT_PROJ, VECTOR, WEIGHT

ROLES = (EMBEDDING, IN_PROJ, OUT_PROJ, WEIGHT, VECTOR)
PROJECTIONS = {**mha.ROLES, **mlp.ROLES}


def param_role(path: str, ndim: int) -> str:
    """The role of the parameter (or an optimizer moment of one) at ``path``
    (``"blocks/0/attn/qkv/w"``) with ``ndim`` dimensions: ``VECTOR`` if 1-D (norm scales,
    biases); a linear's ``w`` is ``IN_PROJ`` / ``OUT_PROJ`` where its layer says so
    (``mha.ROLES``, ``mlp.ROLES``), else ``WEIGHT``; any other table is an ``EMBEDDING``."""
    names = path.split("/")
    if ndim < 2:
        return VECTOR
    if names[-1] == "w":
        return PROJECTIONS.get(names[-2] if len(names) > 1 else "", WEIGHT)
    return EMBEDDING
