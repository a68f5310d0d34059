"""Packed documents (``document_ids``): no token sees another document, positions restart."""

import functools

import jax
import numpy as np
import pytest

from transformax.models import decoder, gpt, llama

MODELS = {
    "gpt": (gpt, gpt.Config(vocab_size=96, n_layer=2, n_head=4, n_embd=32, block_size=32)),
    "llama": (llama, llama.Config(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, dim=32,
                                  hidden_dim=64, max_seq_len=32)),
}
# row 0: three documents (5, 7, 4 tokens); row 1: one
IDS = np.array([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16], np.int32)


@functools.cache
def built(name):
    module, cfg = MODELS[name]
    return (module, jax.jit(module.init, static_argnums=1)(jax.random.key(0), cfg), cfg,
            jax.jit(module.apply, static_argnames=("cfg", "train")))


@pytest.mark.parametrize("name", list(MODELS))
def test_a_document_is_computed_as_if_alone(name, tokens):
    module, params, cfg, apply = built(name)
    packed = np.asarray(apply(params, tokens, cfg, document_ids=IDS))
    other = tokens.copy()
    other[0, :5] = (other[0, :5] + 1) % 96  # perturb documents 0 and 2 of row 0
    other[0, 12:] = (other[0, 12:] + 7) % 96
    perturbed = np.asarray(apply(params, other, cfg, document_ids=IDS))
    np.testing.assert_array_equal(perturbed[0, 5:12], packed[0, 5:12])
    assert np.abs(perturbed[0, :5] - packed[0, :5]).max() > 1e-3
    # document 1 alone (positions 0..6, nothing before it), padded to the same shape
    alone = np.zeros_like(tokens)
    alone[0, :7] = tokens[0, 5:12]
    np.testing.assert_allclose(packed[0, 5:12], np.asarray(apply(params, alone, cfg))[0, :7],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[1], np.asarray(apply(params, tokens, cfg))[1],
                               atol=1e-5, rtol=1e-5)


def test_document_positions(eager):
    np.testing.assert_array_equal(jax.jit(decoder.document_positions)(IDS),
                                  eager(decoder.document_positions, IDS))
    np.testing.assert_array_equal(decoder.document_positions(IDS)[0],
                                  [*range(5), *range(7), *range(4)])


def test_document_ids_shape_error(tokens):
    module, params, cfg, _ = built("gpt")
    with pytest.raises(ValueError, match=r"document_ids must have the tokens' shape \(2, 16\), "
                                         r"got \(2, 15\)"):
        module.apply(params, tokens, cfg, document_ids=IDS[:, :15])
