"""Pure-functional transformer models on parameter pytrees: ``gpt`` (GPT-2), ``llama``
(Llama family), ``bert``. Each module has ``Config``, ``init``, ``apply``, ``num_params`` and
``from_hf``; the decoders also ``init_cache`` / ``apply_cached`` for ``transformax.generate``.

Hugging Face: ``from_hf`` (a ``transformers`` model, or a state dict and its config) and
``load_pretrained(folder)`` return ``(module, params, cfg)``; ``save_pretrained(module, params,
cfg, folder)`` writes a folder ``transformers`` loads. Folders are read and written without
torch or ``transformers``.

Precision: ``Config(compute_dtype="bfloat16")`` keeps f32 parameters and runs matmuls and
attention in bf16 (norm statistics and softmax in f32); the tests hold bf16 outputs within
2% of the largest f32 output magnitude on small random models.
"""

from transformax.models.pretrained import (MODEL_TYPES, from_hf, load_pretrained, module_for,
                                           save_pretrained)

__all__ = ["MODEL_TYPES", "from_hf", "load_pretrained", "module_for", "save_pretrained"]
