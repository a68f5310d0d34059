"""Hugging Face checkpoints <-> our parameter pytrees, both ways from one name table per model.

A model module describes its Hugging Face layout with :class:`Layout` (``hf_layout(cfg, head)``)
and its config with ``config_from_hf`` / ``config_to_hf``; :func:`from_hf` and :func:`to_hf` do
the rest. Conversion is strict: every tensor the config needs must be there with its shape, and
every tensor there must be used (or be a known buffer, or an equal copy of a tied one).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

HEADS = ("lm_head.", "cls.")  # output heads: top-level names, outside the base model's prefix


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Our leaf ``path`` (``"blocks/0/attn/qkv/w"``) and the Hugging Face tensors ``names``
    concatenated along its last axis, ``widths`` wide each; ``transpose``: stored ``(out, in)``
    (torch ``Linear``)."""

    path: str
    names: tuple[str, ...]
    widths: tuple[int, ...] | None = None
    transpose: bool = False


@dataclasses.dataclass
class Layout:
    """How a model's params are stored by Hugging Face. Names are relative to ``prefix``
    (``"transformer."``) except the heads (:data:`HEADS`); ``tied``: names that must equal
    another tensor when present (a tied output head); ``ignore``: patterns of buffers and
    unused parts (the pooler) skipped on reading; ``base_only``: write without the prefix."""

    prefix: str
    tied: dict[str, str] = dataclasses.field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    base_only: bool = False
    tensors: list[Tensor] = dataclasses.field(default_factory=list)

    def add(self, path: str, *names: str, widths=None, transpose: bool = False) -> None:
        self.tensors.append(Tensor(path, names, None if widths is None else tuple(widths),
                                   transpose))

    def linear(self, path: str, name: str, *, bias: bool = True, conv1d: bool = False) -> None:
        """``name.weight`` (+ ``.bias``): torch ``Linear`` stores ``(out, in)``, GPT-2's
        ``Conv1D`` (``conv1d=True``) ``(in, out)`` like us."""
        self.add(f"{path}/w", f"{name}.weight", transpose=not conv1d)
        if bias:
            self.add(f"{path}/b", f"{name}.bias")

    def fused_linear(self, path: str, names: list[str], widths: list[int], *, bias: bool) -> None:
        """Torch ``Linear``s ``names`` as one linear, their outputs side by side (qkv, gate/up)."""
        self.add(f"{path}/w", *[f"{n}.weight" for n in names], widths=widths, transpose=True)
        if bias:
            self.add(f"{path}/b", *[f"{n}.bias" for n in names], widths=widths)

    def layer_norm(self, path: str, name: str) -> None:
        self.add(f"{path}/scale", f"{name}.weight")
        self.add(f"{path}/bias", f"{name}.bias")

    def hf_name(self, name: str) -> str:
        """The name as written: under the prefix unless a head or ``base_only``."""
        return name if name.startswith(HEADS) or self.base_only else self.prefix + name


def model_type(config) -> str | None:
    """The ``model_type`` of a Hugging Face config (a ``PretrainedConfig`` or a ``config.json``
    dict)."""
    return (config.get("model_type") if isinstance(config, Mapping)
            else getattr(config, "model_type", None))


def hf_config(config, defaults: dict) -> dict:
    """A Hugging Face config (a ``PretrainedConfig`` or a ``config.json`` dict) as a dict,
    ``defaults`` (the ``transformers`` class defaults, with ``model_type``) filling the keys it
    leaves out. A config of another ``model_type`` raises ``ValueError``."""
    if not isinstance(config, Mapping):
        config = config.to_dict()
    config = {**defaults, **config}
    if config["model_type"] != defaults["model_type"]:
        raise ValueError(f"from_hf: a model_type={config['model_type']!r} config, expected "
                         f"{defaults['model_type']!r} (transformax.models.from_hf picks the "
                         f"module by model_type)")
    return config


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in leaves}


def _fill(tree, leaves: dict, prefix: str = ""):
    """``tree``'s structure with ``leaves[path]`` at each leaf; subtrees without any dropped."""
    if isinstance(tree, dict):
        out = {k: _fill(v, leaves, f"{prefix}{k}/") for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not _empty(v)}
    if isinstance(tree, list):
        return [_fill(v, leaves, f"{prefix}{i}/") for i, v in enumerate(tree)]
    return leaves.get(prefix[:-1])


def _empty(tree) -> bool:
    return isinstance(tree, dict) and not tree


def read_state(module, state: Mapping, cfg) -> dict:
    """Our params for ``cfg`` from a Hugging Face state dict (name -> array, torch or NumPy).

    Raises ``ValueError`` naming every missing tensor, every tensor the config does not use
    (a different layer count, an untied head, biases) and any misshapen or untied one."""
    original = {k.removeprefix(module.HF_PREFIX): k for k in state}  # for the messages
    state = {k.removeprefix(module.HF_PREFIX): v for k, v in state.items()}
    layout = module.hf_layout(cfg, head=any(k.startswith(HEADS) for k in state))
    abstract = jax.eval_shape(functools.partial(module.init, jax.random.key(0), cfg))
    shapes = _shapes(abstract)
    missing, leaves, used = [], {}, set()
    for t in layout.tensors:
        shape = shapes[t.path]
        widths = t.widths or (shape[-1],)
        parts = []
        for name, width in zip(t.names, widths):
            expected = (*shape[:-1], width)[::-1] if t.transpose else (*shape[:-1], width)
            if name not in state:
                missing.append(layout.hf_name(name))
                continue
            value = _numpy(state[name])
            if value.shape != expected:
                raise ValueError(f"from_hf: tensor {original[name]!r} has shape "
                                 f"{value.shape}, expected {expected}")
            used.add(name)
            parts.append(value.T if t.transpose else value)
        if len(parts) == len(t.names):
            leaves[t.path] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    for name, source in layout.tied.items():
        if name in state and source in state:
            if not np.array_equal(_numpy(state[name]), _numpy(state[source])):
                raise ValueError(f"from_hf: tensor {name!r} differs from {source!r}, but the "
                                 f"config ties them (tie_word_embeddings)")
            used.add(name)
    unused = sorted(original[k] for k in state.keys() - used
                    if not any(fnmatch.fnmatchcase(k, p) for p in layout.ignore))
    if missing or unused:
        problems = ([f"missing tensors {_names(missing)}"] if missing else []) + (
            [f"tensors the config does not use {_names(unused)}"] if unused else [])
        raise ValueError(f"from_hf: the state dict does not match the config: "
                         f"{'; '.join(problems)} (check n_layer, tie_word_embeddings, biases)")
    dtype = cfg.policy.param_dtype
    return _fill(abstract, {p: jnp.asarray(v, dtype) for p, v in leaves.items()})


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def write_state(module, params: dict, cfg) -> dict[str, np.ndarray]:
    """``params`` as a Hugging Face state dict of NumPy arrays (tied tensors written once)."""
    leaves = {jax.tree_util.keystr(p, simple=True, separator="/"): x
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    layout = module.hf_layout(cfg, head=True)
    head_paths = {t.path for t in layout.tensors if t.names[0].startswith(HEADS)}
    if not head_paths <= leaves.keys():  # a BERT without its MLM head
        layout = module.hf_layout(cfg, head=False)
    if set(leaves) != {t.path for t in layout.tensors}:
        raise ValueError(f"to_hf: params do not match the config: unexpected "
                         f"{sorted(set(leaves) - {t.path for t in layout.tensors})}, missing "
                         f"{sorted({t.path for t in layout.tensors} - set(leaves))}")
    state = {}
    for t in layout.tensors:
        value = np.asarray(leaves[t.path])
        parts = (np.split(value, np.cumsum(t.widths)[:-1], axis=-1) if t.widths else [value])
        for name, part in zip(t.names, parts):
            state[layout.hf_name(name)] = np.ascontiguousarray(part.T if t.transpose else part)
    return state


def resolve_config(module, model_or_state_dict, config, overrides: dict):
    """Our config for ``from_hf``: ``config`` (ours, a Hugging Face one or a ``config.json``
    dict) if given, else the model's own ``.config``; ``overrides`` replace fields."""
    config = config if config is not None else getattr(model_or_state_dict, "config", None)
    if config is None:
        raise ValueError("from_hf: a state dict needs config= (the Hugging Face config, its "
                         "config.json dict, or a transformax Config); a model brings its own")
    if isinstance(config, module.Config):
        return dataclasses.replace(config, **overrides)
    return module.config_from_hf(config, **overrides)


def from_hf(module, model_or_state_dict, config, overrides: dict):
    """``(module, params, cfg)``: the models' ``from_hf``."""
    cfg = resolve_config(module, model_or_state_dict, config, overrides)
    state = (model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict")
             else model_or_state_dict)
    return module, read_state(module, state, cfg), cfg
