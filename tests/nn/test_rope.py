import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformax import nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

LLAMA3 = nn.RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=64)


@pytest.mark.parametrize("scaling, hf", [
    (None, {"rope_type": "default"}),
    (nn.RopeScaling(kind="linear", factor=4.0), {"rope_type": "linear", "factor": 4.0}),
    (LLAMA3, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
])
def test_inverse_frequencies_match_hugging_face(scaling, hf):
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4,
                                   rope_parameters={"rope_theta": 500000.0, **hf})
    ref = ROPE_INIT_FUNCTIONS[hf["rope_type"]](cfg)[0] if hf["rope_type"] != "default" else (
        1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    np.testing.assert_allclose(nn.inverse_frequencies(64, 500000.0, scaling), ref, rtol=1e-6)


def test_apply_rope_matches_hugging_face():
    q, k = (jax.random.normal(jax.random.key(i), (2, 6, 3, 16)) for i in range(2))  # (B, T, H, E)
    positions = jnp.array([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    cos, sin = nn.rope_angles(positions, nn.inverse_frequencies(16, 10000.0, LLAMA3))
    assert cos.shape == (2, 6, 8)
    tc, ts = (torch.from_numpy(np.concatenate([np.asarray(c)] * 2, -1)) for c in (cos, sin))
    rq, rk = apply_rotary_pos_emb(*(torch.from_numpy(np.array(x)) for x in (q, k)), tc, ts,
                                  unsqueeze_dim=2)
    np.testing.assert_allclose(nn.apply_rope(q, cos, sin), rq, atol=1e-5)
    np.testing.assert_allclose(nn.apply_rope(k, cos, sin), rk, atol=1e-5)


def test_jit_parity():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3, 16))
    inv = nn.inverse_frequencies(16, 10000.0, LLAMA3)

    def f(x):
        return nn.apply_rope(x, *nn.rope_angles(jnp.arange(6), inv))

    with jax.disable_jit():
        eager = f(x)
    np.testing.assert_allclose(jax.jit(f)(x), eager, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="rotary head_dim must be even, got 15"):
        nn.inverse_frequencies(15)
    with pytest.raises(ValueError, match="RopeScaling kind='yarn': expected 'linear' or 'llama3'"):
        nn.RopeScaling(kind="yarn")
