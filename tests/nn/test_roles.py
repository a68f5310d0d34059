"""Parameter roles of every model's parameters, and the training rules built on them."""

import jax
import pytest

from transformax import nn
from transformax.models import bert, gpt, llama
from transformax.train import config, optim

CONFIGS = {
    "gpt": (gpt, gpt.Config(vocab_size=8, n_layer=1, n_head=2, n_embd=8, block_size=8)),
    "llama": (llama, llama.Config(vocab_size=8, n_layer=1, n_head=2, n_kv_head=1, dim=8,
                                  hidden_dim=16, max_seq_len=8)),
    "bert": (bert, bert.Config(vocab_size=8, n_layer=1, n_head=2, dim=8, hidden_dim=16,
                               max_position=8)),
}
EXPECTED = {  # every path of a role other than "vector" (the 1-D norms and biases)
    "gpt": {"embedding": {"wte", "wpe"},
            "in_proj": {"blocks/0/attn/qkv/w", "blocks/0/mlp/fc/w"},
            "out_proj": {"blocks/0/attn/out/w", "blocks/0/mlp/proj/w"}},
    "llama": {"embedding": {"embed"}, "weight": {"lm_head/w"},
              "in_proj": {"blocks/0/attn/qkv/w", "blocks/0/mlp/gate_up/w"},
              "out_proj": {"blocks/0/attn/out/w", "blocks/0/mlp/down/w"}},
    "bert": {"embedding": {"embed/word", "embed/position", "embed/token_type"},
             "weight": {"mlm/transform/w"},
             "in_proj": {"blocks/0/attn/qkv/w", "blocks/0/mlp/fc/w"},
             "out_proj": {"blocks/0/attn/out/w", "blocks/0/mlp/proj/w"}},
}


def leaves(name):
    module, cfg = CONFIGS[name]
    params = jax.eval_shape(lambda key: module.init(key, cfg), jax.random.key(0))
    return params, {optim.param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_roles_of_every_model_parameter(name):
    _, flat = leaves(name)
    roles = {path: nn.param_role(path, x.ndim) for path, x in flat.items()}
    assert set(roles.values()) <= set(nn.ROLES)
    for role in nn.ROLES:
        got = {p for p, r in roles.items() if r == role}
        if role == "vector":
            assert got == {p for p, x in flat.items() if x.ndim == 1}
        else:
            assert got == EXPECTED[name].get(role, set()), role
    # an optimizer moment has its parameter's role
    assert nn.param_role("opt_state/1/0/mu/blocks/0/attn/qkv/w", 2) == "in_proj"


@pytest.mark.parametrize("no_decay, decayed", [
    (["embedding"], {"blocks/0/attn/qkv/w", "blocks/0/attn/out/w", "blocks/0/mlp/gate_up/w",
                     "blocks/0/mlp/down/w", "lm_head/w"}),
    (["embedding", "lm_*"], {"blocks/0/attn/qkv/w", "blocks/0/attn/out/w",
                             "blocks/0/mlp/gate_up/w", "blocks/0/mlp/down/w"}),
    (["in_proj", "out_proj"], {"embed", "lm_head/w"}),
])
def test_no_decay_takes_roles_and_path_patterns(no_decay, decayed):
    params, flat = leaves("llama")
    mask = optim.decay_mask(params, config.OptimConfig(no_decay=no_decay))
    got = {optim.param_path(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert got == decayed
