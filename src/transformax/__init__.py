"""transformax: accelerated transformers for JAX."""

from transformax.attention import (Backend, CausalMask, causal_lower_right, causal_upper_left,
                                   explain, scaled_dot_product_attention, sdpa, sdpa_kernel)

__all__ = ["Backend", "CausalMask", "causal_lower_right", "causal_upper_left", "explain",
           "scaled_dot_product_attention", "sdpa", "sdpa_kernel"]
