"""Mixed precision as one policy: parameters stored in one dtype, computed in another, outputs
returned in a third. Models apply it once, at the top and bottom of ``apply``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """Dtype fields shared by every model ``Config`` (names, so configs stay YAML-friendly).

    ``param_dtype``: what ``init`` creates; ``compute_dtype``: what matmuls and attention run in
    (norm statistics and softmax stay f32); ``output_dtype``: the dtype ``apply`` returns.
    """

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    output_dtype: str = "float32"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ValueError(f"{name}={value!r}: expected one of {DTYPES}")

    @property
    def policy(self) -> Policy:
        return Policy(jnp.dtype(self.param_dtype), jnp.dtype(self.compute_dtype),
                      jnp.dtype(self.output_dtype))


@dataclasses.dataclass(frozen=True)
class Policy:
    """Resolved dtypes; see :class:`Precision`."""

    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype
    output_dtype: jnp.dtype

    def cast_to_compute(self, tree):
        """Floating-point leaves of ``tree`` in the compute dtype (no-op where they already are)."""
        return _cast(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        """Floating-point leaves of ``tree`` in the output dtype."""
        return _cast(tree, self.output_dtype)


def _cast(tree, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)
