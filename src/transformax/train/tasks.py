"""What each architecture trains on: causal LM for ``gpt`` and ``llama``, masked LM for ``bert``.

A :class:`Task` knows its model module and how to turn a batch into a summed loss; the model's
``Config`` says the rest (``max_len``, ``n_layer``, ``n_head``, ``head_dim``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import ModuleType

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Task:
    """One trainable architecture (see :data:`TASKS`)."""

    arch: str
    objective: str  # "clm" (next token) or "mlm" (masked tokens)

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"transformax.models.{self.arch}")

    @property
    def decoder(self) -> bool:
        """Whether the model generates text (causal LM)."""
        return self.objective == "clm"

    def loss(self, params, batch: dict, model_cfg, rng: jax.Array | None = None):
        """``(sum of token losses, number of counted tokens)`` in f32. ``rng`` given: train mode
        (dropout keys from it); ``batch``: ``inputs``, ``targets`` and, for MLM or packed
        documents, ``weights``; packed: ``document_ids``."""
        train = rng is not None
        if self.objective == "clm":
            logits = self.module.apply(params, batch["inputs"], model_cfg,
                                       document_ids=batch.get("document_ids"), train=train,
                                       rng=rng)
        else:
            hidden = self.module.apply(params, batch["inputs"], model_cfg,
                                       document_ids=batch.get("document_ids"), train=train,
                                       rng=rng)
            logits = self.module.mlm_logits(params, hidden, model_cfg)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"])
        if "weights" not in batch:
            return losses.sum(), jnp.asarray(losses.size, jnp.float32)
        weights = batch["weights"].astype(jnp.float32)
        return (losses * weights).sum(), weights.sum()

    def flops_per_token(self, params, model_cfg, seq_len: int) -> float:
        """Training FLOPs per token, ``6 N + 12 L d T`` (PaLM's estimate; N counts every
        parameter except position tables, so the tied output projection counts once)."""
        n = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
                if "wpe" not in jax.tree_util.keystr(path))
        width = model_cfg.n_head * model_cfg.head_dim  # of the attention
        return 6.0 * n + 12.0 * model_cfg.n_layer * width * seq_len


TASKS = {
    "gpt": Task("gpt", "clm"),
    "llama": Task("llama", "clm"),
    "bert": Task("bert", "mlm"),
}
