"""Pure layers on explicit parameters (nested dicts of arrays): ``*_init`` builds a layer's
params, the layer function applies them."""

from transformax.nn import init
from transformax.nn.dropout import dropout
from transformax.nn.kv_cache import KVCache, init_cache
from transformax.nn.linear import embed, embedding_init, linear, linear_init, unembed
from transformax.nn.mha import attention_init, self_attention, softcap
from transformax.nn.mlp import gelu_mlp, gelu_mlp_init, swiglu, swiglu_init
from transformax.nn.norm import layer_norm, layer_norm_init, rms_norm, rms_norm_init
from transformax.nn.policy import Policy, Precision
from transformax.nn.roles import ROLES, param_role
from transformax.nn.rope import RopeScaling, apply_rope, inverse_frequencies, rope_angles

__all__ = [
    "KVCache", "Policy", "Precision", "ROLES", "RopeScaling", "apply_rope", "attention_init",
    "dropout", "embed", "embedding_init", "gelu_mlp", "gelu_mlp_init", "init",
    "init_cache", "inverse_frequencies", "layer_norm", "layer_norm_init", "linear",
    "linear_init", "param_role", "rms_norm", "rms_norm_init", "rope_angles", "self_attention",
    "softcap", "swiglu", "swiglu_init", "unembed",
]
