import os
import pathlib
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", False)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Kernel configs are the host defaults unless a test pins or tunes them: no user tuning cache.
os.environ["TRANSFORMAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="transformax-test-cache-")
os.environ.pop("TRANSFORMAX_AUTOTUNE", None)

import transformax  # noqa: E402  (after the environment above)
from transformax import compile_cache  # noqa: E402

# The commands' persistent compilation cache, in-process too: the many runs of the same small
# configs (and their subprocesses) compile each program once.
compile_cache.enable()

_REPO = pathlib.Path(__file__).resolve().parents[1]
assert pathlib.Path(transformax.__file__).resolve().is_relative_to(_REPO / "src"), (
    f"the tests import transformax from {transformax.__file__}, not from this checkout "
    f"({_REPO / 'src'}): another install shadows it")

settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "12")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    platform = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))


@pytest.fixture
def hf_gpt2_folder(tmp_path):
    """A small random GPT-2 (vocabulary 96, end-of-text 95, no tokenizer) saved by transformers
    in ``tmp_path``: ``(folder, params, cfg)`` with the params transformax reads from it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformax.models import gpt

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=95,
        eos_token_id=95))
    model.save_pretrained(tmp_path)
    _, params, cfg = gpt.from_hf(model)
    return tmp_path, params, cfg
