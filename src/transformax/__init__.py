"""transformax: accelerated transformers for JAX.

``tfx.sdpa`` and its kernel selection are imported eagerly; the submodules ``nn``, ``models``,
``generate``, ``flax``, ``train`` and ``quant`` load on first use (so ``import transformax`` stays light).
"""

import importlib

from transformax.attention import (Backend, CausalMask, autotune, causal_lower_right,
                                   causal_upper_left, explain, scaled_dot_product_attention, sdpa,
                                   sdpa_kernel)
from transformax.tuning import kernel_config

_SUBMODULES = ("nn", "models", "generate", "flax", "train", "quant")

__all__ = ["Backend", "CausalMask", "autotune", "causal_lower_right", "causal_upper_left",
           "explain", "kernel_config", "scaled_dot_product_attention", "sdpa", "sdpa_kernel",
           *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"transformax.{name}")
    raise AttributeError(f"module 'transformax' has no attribute {name!r}")
