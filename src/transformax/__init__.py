"""transformax: accelerated transformers for JAX.

Every public name (``tfx.sdpa`` and its kernel selection, the masks, ``flex_attention``) and the
submodules ``nn``, ``models``, ``generate``, ``flax``, ``train`` and ``quant`` load on first use,
so ``import transformax`` (and every command-line tool's start) stays light.
"""

from transformax import _lazy

_ATTENTION = ("Backend", "BlockMask", "CausalMask", "Mask", "autotune", "band",
              "causal_lower_right", "causal_upper_left", "chunked", "create_block_mask",
              "document_mask", "explain", "flex_attention", "key_padding", "prefix_lm",
              "scaled_dot_product_attention", "sdpa", "sdpa_kernel", "sliding_window")
_SUBMODULES = ("nn", "models", "generate", "flax", "train", "quant")

__all__ = [*_ATTENTION, "kernel_config", *_SUBMODULES]
__getattr__ = _lazy.attributes(__name__, {**{name: ".attention" for name in _ATTENTION},
                                          "kernel_config": ".tuning",
                                          **{name: f".{name}" for name in _SUBMODULES}})
