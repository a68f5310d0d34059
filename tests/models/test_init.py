"""``init`` of every model, jitted and not (tiny configs sharing shapes keep the eager run short)."""

import jax
import numpy as np
import pytest

from transformax.models import bert, gpt, llama

CONFIGS = [
    (gpt, gpt.Config(vocab_size=8, n_layer=1, n_head=2, n_embd=8, block_size=8)),
    (llama, llama.Config(vocab_size=8, n_layer=1, n_head=2, n_kv_head=1, dim=8, hidden_dim=8,
                         max_seq_len=8)),
    (bert, bert.Config(vocab_size=8, n_layer=1, n_head=2, dim=8, hidden_dim=32, max_position=8)),
]


@pytest.mark.parametrize("module, cfg", CONFIGS, ids=["gpt", "llama", "bert"])
def test_init_jit_parity(module, cfg, eager):
    params = jax.jit(module.init, static_argnums=1)(jax.random.key(0), cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params,
                 eager(module.init, jax.random.key(0), cfg))
    std = np.std(np.asarray(params["blocks"][0]["attn"]["qkv"]["w"]))
    assert 0.005 < std < 0.05  # Normal(0, 0.02)
