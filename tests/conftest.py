import os
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", False)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Kernel configs are the host defaults unless a test pins or tunes them: no user tuning cache.
os.environ["TRANSFORMAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="transformax-test-cache-")
os.environ.pop("TRANSFORMAX_AUTOTUNE", None)

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
