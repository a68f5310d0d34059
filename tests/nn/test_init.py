"""Initialiser statistics: each weight is Normal(0, std) with the std asked for (tight bounds on
large samples, so a doubled or halved std fails), biases zero."""

import jax
import numpy as np
import pytest

from transformax import nn
from transformax.models import gpt

KEY = jax.random.key(0)


def assert_normal(x, std):
    x = np.asarray(x, np.float64)
    # 2^18 samples: the sample std is within 1% of std (about 7 standard errors).
    assert x.size >= 2 ** 18
    assert abs(x.std() / std - 1) < 0.01, (x.std(), std)
    assert abs(x.mean()) < 0.01 * std


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_linear_and_embedding_init(std):
    p = nn.linear_init(KEY, 512, 512, std=std)
    assert_normal(p["w"], std)
    assert not np.asarray(p["b"]).any()
    assert_normal(nn.embedding_init(KEY, 1024, 256, std=std), std)


def test_gpt_init_uses_init_std_and_the_residual_std():
    cfg = gpt.Config(vocab_size=1024, n_layer=2, n_head=4, n_embd=256, block_size=1024)
    p = jax.jit(gpt.init, static_argnums=1)(KEY, cfg)
    block = p["blocks"][0]
    assert_normal(p["wte"], cfg.init_std)
    assert_normal(np.concatenate([block["attn"]["qkv"]["w"].ravel(),
                                  block["mlp"]["fc"]["w"].ravel()]), cfg.init_std)
    residual = cfg.init_std / np.sqrt(2 * cfg.n_layer)
    assert_normal(np.concatenate([block["attn"]["out"]["w"].ravel(),
                                  block["mlp"]["proj"]["w"].ravel()]), residual)
