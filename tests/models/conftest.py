import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tokens():
    """Two rows of 16 token ids below 96 (every test model's vocabulary has at least 96)."""
    return np.random.RandomState(0).randint(0, 96, (2, 16)).astype(np.int32)


@pytest.fixture(scope="session")
def padding():
    """Attention mask for ``tokens``: row 1 has 5 padding tokens at the end."""
    mask = np.ones((2, 16), np.int32)
    mask[1, 11:] = 0
    return mask


@pytest.fixture(scope="session")
def hf_run():
    """``hf_run(model, tokens, **kwargs)``: a Hugging Face model on NumPy inputs, no grad."""

    def run(model, tokens, **kwargs):
        with torch.no_grad():
            return model(torch.as_tensor(tokens, dtype=torch.long),
                         **{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                            for k, v in kwargs.items()})

    return run


@pytest.fixture(scope="session")
def eager():
    """``eager(f, *args)``: ``f(*args)`` with jit disabled (for jit / non-jit parity)."""

    def run(f, *args, **kwargs):
        with jax.disable_jit():
            return f(*args, **kwargs)

    return run
