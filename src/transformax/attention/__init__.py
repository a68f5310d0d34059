"""Scaled dot-product attention: the public functions, masks, kernels and their selection."""

from transformax.attention.api import autotune, explain, flex_attention, sdpa
from transformax.attention.masks import (BlockMask, CausalMask, Mask, band, causal_lower_right,
                                         causal_upper_left, chunked, create_block_mask,
                                         document_mask, key_padding, prefix_lm, sliding_window)
from transformax.attention.select import Backend, sdpa_kernel

scaled_dot_product_attention = sdpa

__all__ = ["Backend", "BlockMask", "CausalMask", "Mask", "autotune", "band", "causal_lower_right",
           "causal_upper_left", "chunked", "create_block_mask", "document_mask", "explain",
           "flex_attention", "key_padding", "prefix_lm", "scaled_dot_product_attention", "sdpa",
           "sdpa_kernel", "sliding_window"]
