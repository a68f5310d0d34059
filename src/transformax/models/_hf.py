"""Reading a Hugging Face torch model or state dict for the models' ``from_hf``."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


class HFTensors:
    """The tensors of a Hugging Face model or state dict, keyed without the wrapper prefix
    (``transformer.``, ``model.``, ``bert.``), fetched with a shape check."""

    def __init__(self, model_or_state_dict, prefix: str, dtype):
        state = (model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict")
                 else dict(model_or_state_dict))
        self.state = {k.removeprefix(prefix): v for k, v in state.items()}
        self.dtype = dtype

    def get(self, name: str, shape: tuple[int, ...], *, transpose: bool = False):
        """Tensor ``name`` as a ``shape``-d array; ``transpose``: stored as ``shape[::-1]`` (torch
        ``Linear`` weights are ``(out, in)``)."""
        if name not in self.state:
            raise KeyError(f"from_hf: missing tensor {name!r} (the state dict has "
                           f"{len(self.state)} tensors, e.g. {sorted(self.state)[:4]})")
        value = self.state[name]
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().float().cpu().numpy()
        value = np.asarray(value, np.float32)
        expected = tuple(shape)[::-1] if transpose else tuple(shape)
        if value.shape != expected:
            raise ValueError(f"from_hf: tensor {name!r} has shape {value.shape}, expected "
                             f"{expected}")
        if transpose:
            value = value.T
        return jnp.asarray(value, self.dtype)

    def linear(self, name: str, d_in: int, d_out: int, *, bias: bool = True,
               conv1d: bool = False) -> dict:
        """``name.weight`` (+ ``name.bias``) as our linear params. Torch ``Linear`` weights are
        ``(out, in)``; GPT-2's ``Conv1D`` (``conv1d=True``) already stores ``(in, out)``."""
        params = {"w": self.get(f"{name}.weight", (d_in, d_out), transpose=not conv1d)}
        if bias:
            params["b"] = self.get(f"{name}.bias", (d_out,))
        return params

    def layer_norm(self, name: str, dim: int) -> dict:
        """``name.weight`` / ``name.bias`` as our LayerNorm params."""
        return {"scale": self.get(f"{name}.weight", (dim,)),
                "bias": self.get(f"{name}.bias", (dim,))}

    def fused_linear(self, names: list[str], d_in: int, widths: list[int], *,
                     bias: bool) -> dict:
        """Torch ``Linear``s ``names`` (``d_in -> width`` each) as one ``d_in -> sum(widths)``
        linear, columns in the given order (fused qkv, gate/up)."""
        parts = [self.linear(n, d_in, w, bias=bias) for n, w in zip(names, widths)]
        return {k: jnp.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}


def resolve_config(model_or_state_dict, config, config_cls, config_from_hf, overrides: dict):
    """Our config for ``from_hf``: ``config`` (ours or a Hugging Face one) if given, else the
    model's own ``.config``; ``overrides`` replace fields. An error for a bare state dict."""
    config = config if config is not None else getattr(model_or_state_dict, "config", None)
    if config is None:
        raise ValueError("from_hf: a state dict needs config= (the Hugging Face config or a "
                         "transformax Config); a model brings its own")
    if isinstance(config, config_cls):
        return dataclasses.replace(config, **overrides)
    return config_from_hf(config, **overrides)
