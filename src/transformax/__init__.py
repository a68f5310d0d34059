"""transformax: accelerated transformers for JAX.

``tfx.sdpa`` and its kernel selection are imported eagerly; the submodules ``nn``, ``models``,
``generate``, ``flax``, ``train`` and ``quant`` load on first use (so ``import transformax`` stays light).
"""

import importlib

from transformax.attention import (Backend, BlockMask, CausalMask, Mask, autotune, band,
                                   causal_lower_right, causal_upper_left, chunked,
                                   create_block_mask, document_mask, explain, flex_attention,
                                   key_padding, prefix_lm, scaled_dot_product_attention, sdpa,
                                   sdpa_kernel, sliding_window)
from transformax.tuning import kernel_config

_SUBMODULES = ("nn", "models", "generate", "flax", "train", "quant")

__all__ = ["Backend", "BlockMask", "CausalMask", "Mask", "autotune", "band", "causal_lower_right",
           "causal_upper_left", "chunked", "create_block_mask", "document_mask", "explain",
           "flex_attention", "key_padding", "kernel_config", "prefix_lm",
           "scaled_dot_product_attention", "sdpa", "sdpa_kernel", "sliding_window", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"transformax.{name}")
    raise AttributeError(f"module 'transformax' has no attribute {name!r}")
