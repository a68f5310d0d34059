"""Hugging Face model folders on disk, read and written with ``safetensors``' NumPy API: no torch,
no ``transformers``.

``load_pretrained(folder)`` reads ``config.json`` and ``model.safetensors`` (or the shards a
``model.safetensors.index.json`` lists); ``save_pretrained(module, params, cfg, folder)`` writes
a folder that ``transformers``' ``AutoModelForCausalLM`` (``AutoModel`` /
``AutoModelForMaskedLM`` for BERT) loads to the same outputs.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from transformax.models import _hf

MODEL_TYPES = {"gpt2": "gpt", "llama": "llama", "mistral": "llama", "bert": "bert"}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def module_for(config) -> object:
    """The model module (``gpt``, ``llama``, ``bert``) for a Hugging Face config's
    ``model_type`` (a ``PretrainedConfig`` or a ``config.json`` dict)."""
    model_type = _hf.model_type(config)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; expected one of "
                         f"{sorted(MODEL_TYPES)}")
    return importlib.import_module(f"transformax.models.{MODEL_TYPES[model_type]}")


def from_hf(model_or_state_dict, config=None, **overrides):
    """``(module, params, cfg)`` for a Hugging Face model, or a state dict and its ``config``
    (a ``PretrainedConfig`` or a ``config.json`` dict); the module chosen by ``model_type``."""
    hf_cfg = config if config is not None else getattr(model_or_state_dict, "config", None)
    return module_for(hf_cfg).from_hf(model_or_state_dict, config, **overrides)


def read_config(folder: str | Path) -> dict:
    """A model folder's ``config.json`` as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json there (not a Hugging Face model "
                                f"folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def eos_id(folder: str | Path, vocab_size: int) -> int | None:
    """The end-of-text id in ``generation_config.json`` (else ``config.json``); the first of a
    list; ``None`` if neither names one, or (with a warning) if it is outside the vocabulary."""
    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            eos = json.loads((folder / name).read_text()).get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            if isinstance(eos, int) and 0 <= eos < vocab_size:
                return eos
            if eos is not None:
                warnings.warn(f"{folder / name}: eos_token_id={eos} is outside the vocabulary "
                              f"(0 to {vocab_size - 1}); generation will not stop early",
                              stacklevel=2)
                return None
    return None


def read_safetensors(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` or of the shards ``model.safetensors.index.json``
    names, as NumPy arrays."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} or {INDEX} there (found {present}; "
                                f"pytorch_model.bin is not read without torch)")
    state = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{folder / INDEX} names {path.name}, which is missing")
        with safetensors.safe_open(path, framework="numpy") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def load_pretrained(folder: str | Path, *, dtype: str | None = None, **overrides):
    """``(module, params, cfg)`` from a Hugging Face model folder (GPT-2, Llama, Mistral, BERT).
    ``dtype``: the parameters' dtype (default float32, whatever the file stores);
    ``overrides``: other ``Config`` fields (``compute_dtype``)."""
    config = read_config(folder)
    module = module_for(config)
    if dtype is not None:
        overrides["param_dtype"] = dtype
    return module.from_hf(read_safetensors(folder), config, **overrides)


def save_pretrained(module, params: dict, cfg, folder: str | Path) -> Path:
    """Write ``params`` as a Hugging Face model folder: ``config.json`` and
    ``model.safetensors`` (the parameters' own dtype). Returns the folder."""
    if not isinstance(cfg, module.Config):
        raise TypeError(f"save_pretrained: cfg is a {type(cfg).__module__}."
                        f"{type(cfg).__qualname__}, expected {module.__name__}.Config")
    state = _hf.write_state(module, params, cfg)
    config = dict(module.config_to_hf(cfg), dtype=cfg.param_dtype, torch_dtype=cfg.param_dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    safetensors.numpy.save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    return folder
