"""Scaled dot-product attention: the public function, masks, kernels and their selection."""

from transformax.attention.api import autotune, explain, sdpa
from transformax.attention.masks import CausalMask, causal_lower_right, causal_upper_left
from transformax.attention.select import Backend, sdpa_kernel

scaled_dot_product_attention = sdpa

__all__ = ["Backend", "CausalMask", "autotune", "causal_lower_right", "causal_upper_left", "explain",
           "scaled_dot_product_attention", "sdpa", "sdpa_kernel"]
