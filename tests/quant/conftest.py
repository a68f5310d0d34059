import pytest


@pytest.fixture(autouse=True)
def tuning_cache(tmp_path, monkeypatch):
    """An empty tuning cache of the test's own, no autotuning: kernel choices by priority."""
    monkeypatch.setenv("TRANSFORMAX_CACHE_DIR", str(tmp_path / "tuning"))
    monkeypatch.delenv("TRANSFORMAX_AUTOTUNE", raising=False)
    return tmp_path / "tuning"
