"""Text samples from a decoder (a thin layer over ``transformax.generate``)."""

from __future__ import annotations

import jax
import numpy as np

from transformax import generate


def sample_text(task, params, model_cfg, prompt: str, tokenizer, *, num: int,
                max_new_tokens: int, temperature: float, top_k: int, rng: jax.Array) -> list[str]:
    """``num`` continuations of ``prompt`` (encoded by ``tokenizer``, a
    :class:`transformax.tokenizer.Tokenizer`), decoded leniently; at most as many new tokens as
    the model's context leaves after the prompt."""
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    room = model_cfg.max_len - len(ids)
    if len(ids) == 0 or room < 1:
        raise ValueError(f"prompt {prompt!r}: needs 1 to {model_cfg.max_len - 1} tokens")
    new = generate.generate(task.module, params, model_cfg, np.tile(ids, (num, 1)),
                            max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                            top_k=top_k or None, rng=rng)
    rows = np.concatenate([np.tile(ids, (num, 1)), np.asarray(new)], axis=1)
    return [tokenizer.decode(row) for row in rows]
