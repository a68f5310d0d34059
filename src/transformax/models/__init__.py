"""Pure-functional transformer models on parameter pytrees: ``gpt`` (GPT-2), ``llama``
(Llama family), ``bert``. Each module has ``Config``, ``init``, ``apply``, ``num_params`` and
``from_hf``; the decoders also ``init_cache`` / ``apply_cached`` for ``transformax.generate``.

Precision: ``Config(compute_dtype="bfloat16")`` keeps f32 parameters and runs matmuls and
attention in bf16 (norm statistics and softmax in f32); the tests hold bf16 outputs within
2% of the largest f32 output magnitude on small random models.
"""

from __future__ import annotations

import importlib

MODEL_TYPES = {"gpt2": "gpt", "llama": "llama", "bert": "bert"}


def from_hf(model_or_state_dict, config=None, **overrides):
    """``(module, params, cfg)`` for a Hugging Face model (or state dict + ``config``), the
    module chosen by ``config.model_type`` (gpt2, llama, bert)."""
    hf_cfg = config if config is not None else getattr(model_or_state_dict, "config", None)
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"from_hf: model_type={model_type!r} is not supported; expected one of "
                         f"{sorted(MODEL_TYPES)}")
    module = importlib.import_module(f"transformax.models.{MODEL_TYPES[model_type]}")
    params, cfg = module.from_hf(model_or_state_dict, config, **overrides)
    return module, params, cfg
