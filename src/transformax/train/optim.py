"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import fnmatch

import jax
import optax

from transformax.nn import roles
from transformax.train.config import OptimConfig


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio``
    at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)


def param_path(path) -> str:
    """A parameter's pytree path as ``"blocks/0/attn/qkv/w"``."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return "/".join(name(k) for k in path)


def decay_mask(params, cfg: OptimConfig):
    """``True`` where weight decay applies: not on parameters whose path or role
    (:func:`transformax.nn.param_role`) matches a ``cfg.no_decay`` pattern, nor on ``vector``s
    (norms, biases) unless ``cfg.decay_norms_and_biases``."""
    def decays(path, x):
        name = param_path(path)
        role = roles.param_role(name, x.ndim)
        if any(fnmatch.fnmatchcase(name, p) or p == role for p in cfg.no_decay):
            return False
        return role != roles.VECTOR or cfg.decay_norms_and_biases

    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """Clip by global norm (if ``grad_clip > 0``), then AdamW on :func:`schedule`."""
    adamw = optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
