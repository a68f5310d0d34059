"""Llama family: RoPE (with Llama 3 / linear frequency scaling), RMSNorm, SwiGLU, grouped-query
attention, untied or tied output head; Mistral's sliding window and Gemma 2's attention-logit
soft-capping as options.

``params = init(key, cfg)``; ``logits = apply(params, tokens, cfg)``; for generation,
``init_cache`` + ``apply_cached`` (a rolling cache of ``sliding_window`` slots when the model has
one); ``from_hf`` converts a Hugging Face ``LlamaForCausalLM`` or ``MistralForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax

from transformax import nn
from transformax.models import _common, _hf, decoder

num_params = _common.num_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(nn.Precision):
    """Llama hyperparameters; the defaults are Hugging Face's ``LlamaConfig()`` (Llama 2 7B).
    ``head_dim`` defaults to ``dim // n_head``; ``hidden_dim`` is the SwiGLU width;
    ``max_len`` (the decoder contract, :mod:`transformax.models.decoder`) is ``max_seq_len``.
    ``sliding_window``: each query sees itself and the ``sliding_window - 1`` keys before it
    (Mistral). ``attn_logit_softcapping``: attention scores become ``cap * tanh(score / cap)``
    before masking (Gemma 2; needs ``dropout=0``)."""

    max_len_field: ClassVar[str] = "max_seq_len"

    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    dim: int = 4096
    hidden_dim: int = 11008
    head_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: nn.RopeScaling | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim={self.dim} must be a multiple of n_head={self.n_head} "
                                 f"(or set head_dim)")
            object.__setattr__(self, "head_dim", self.dim // self.n_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of "
                             f"n_kv_head={self.n_kv_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (or None), got {self.sliding_window}")
        cap = self.attn_logit_softcapping
        if cap is not None and not cap > 0:
            raise ValueError(f"attn_logit_softcapping must be > 0 (or None), got {cap}")
        if cap is not None and self.dropout:
            raise ValueError(f"attn_logit_softcapping={cap} needs dropout=0 (flex_attention "
                             f"has no attention dropout), got dropout={self.dropout}")

    @property
    def max_len(self) -> int:
        return self.max_seq_len


ARCH = decoder.Arch(embed="embed", position_table=None, attn_norm="attn_norm",
                    mlp_norm="mlp_norm", final_norm="norm", norm=nn.rms_norm, mlp=nn.swiglu)


def init(key: jax.Array, cfg: Config) -> dict:
    """Parameters: Normal(0, init_std) weights, output projections scaled by
    ``1 / sqrt(2 n_layer)``, zero biases, unit RMSNorm scales."""
    dtype, d = cfg.policy.param_dtype, cfg.dim
    k_embed, k_head, *k_blocks = jax.random.split(key, 2 + cfg.n_layer)
    proj_std = nn.init.residual_std(cfg.init_std, cfg.n_layer)

    def block(k):
        k_attn, k_mlp = jax.random.split(k)
        return {"attn_norm": nn.rms_norm_init(d, dtype=dtype),
                "attn": nn.attention_init(k_attn, d, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                                          bias=cfg.attention_bias, std=cfg.init_std,
                                          proj_std=proj_std, dtype=dtype),
                "mlp_norm": nn.rms_norm_init(d, dtype=dtype),
                "mlp": nn.swiglu_init(k_mlp, d, cfg.hidden_dim, bias=cfg.mlp_bias,
                                      std=cfg.init_std, proj_std=proj_std, dtype=dtype)}

    params = {"embed": nn.embedding_init(k_embed, cfg.vocab_size, d, std=cfg.init_std,
                                         dtype=dtype),
              "blocks": [block(k) for k in k_blocks],
              "norm": nn.rms_norm_init(d, dtype=dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = nn.linear_init(k_head, d, cfg.vocab_size, bias=False,
                                           std=cfg.init_std, dtype=dtype)
    return params


def apply(params: dict, tokens: jax.Array, cfg: Config, *, attention_mask: jax.Array | None = None,
          document_ids: jax.Array | None = None, train: bool = False,
          rng: jax.Array | None = None, check_ids: bool = False) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` (``cfg.output_dtype``) for int ``tokens (B, T)``.

    ``attention_mask (B, T)``: nonzero for real tokens, 0 for padding keys (positions stay
    ``0..T-1``). ``document_ids (B, T)``: packed documents (runs of equal ids) that do not see
    each other, positions restarting at each. ``train=True`` applies ``cfg.dropout`` with keys
    drawn from ``rng``. Ids outside the vocabulary raise; inside ``jit`` only with
    ``check_ids=True`` (unchecked, an id too large embeds as NaN and a negative one wraps round).
    """
    return decoder.apply(ARCH, params, tokens, cfg, attention_mask=attention_mask,
                         document_ids=document_ids, train=train, rng=rng, check_ids=check_ids)


def init_cache(cfg: Config, batch: int, max_len: int) -> nn.KVCache:
    """An empty KV cache (``n_kv_head`` heads) for ``batch`` rows of ``max_len <= max_seq_len``
    tokens; with a ``sliding_window``, ``min(max_len, sliding_window)`` slots."""
    return decoder.init_cache(cfg, batch, max_len)


def apply_cached(params: dict, tokens: jax.Array, cfg: Config, cache: nn.KVCache, *,
                 lengths: jax.Array | None = None,
                 check_ids: bool = False) -> tuple[jax.Array, nn.KVCache]:
    """As :func:`transformax.models.gpt.apply_cached`: logits for ``tokens`` continuing each
    row of ``cache``, and the updated cache (``pos`` advanced by ``lengths``, default ``T``);
    ``check_ids`` as there."""
    return decoder.apply_cached(ARCH, params, tokens, cfg, cache, lengths, check_ids)


HF_PREFIX = "model."
HF_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                   intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=None, head_dim=None, hidden_act="silu",
                   max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                   rope_scaling=None, rope_parameters=None, tie_word_embeddings=False,
                   attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                   initializer_range=0.02, sliding_window=None)
MISTRAL_DEFAULTS = dict(HF_DEFAULTS, model_type="mistral", intermediate_size=14336,
                        num_key_value_heads=8, max_position_embeddings=4096 * 32,
                        sliding_window=4096)


def _rope_from_hf(c: dict) -> tuple[float, nn.RopeScaling | None]:
    """``(theta, scaling)`` from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` (transformers 4)."""
    rope = dict(c["rope_parameters"] or {})
    rope.setdefault("rope_theta", c["rope_theta"])
    rope.update(c["rope_scaling"] or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return rope["rope_theta"], None
    if kind == "linear":
        return rope["rope_theta"], nn.RopeScaling(kind="linear", factor=rope["factor"])
    if kind == "llama3":
        return rope["rope_theta"], nn.RopeScaling(
            kind="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position=rope["original_max_position_embeddings"])
    raise ValueError(f"from_hf: rope_type={kind!r} is not supported ('default', 'linear', "
                     f"'llama3')")


def _rope_to_hf(cfg: Config) -> dict:
    s = cfg.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if s.kind == "linear":
        return {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": s.factor}
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position}


def config_from_hf(hf_cfg, **overrides) -> Config:
    """Our ``Config`` for a Hugging Face ``LlamaConfig`` / ``MistralConfig`` or its
    ``config.json`` dict (``overrides`` e.g. dtypes)."""
    mistral = _hf.model_type(hf_cfg) == "mistral"
    c = _hf.hf_config(hf_cfg, MISTRAL_DEFAULTS if mistral else HF_DEFAULTS)
    if c["hidden_act"] != "silu":
        raise ValueError(f"from_hf: hidden_act={c['hidden_act']!r} is not supported (silu)")
    theta, scaling = _rope_from_hf(c)
    return Config(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                  n_head=c["num_attention_heads"],
                  n_kv_head=c["num_key_value_heads"] or c["num_attention_heads"],
                  dim=c["hidden_size"], hidden_dim=c["intermediate_size"],
                  head_dim=c["head_dim"], max_seq_len=c["max_position_embeddings"],
                  rope_theta=theta, rope_scaling=scaling, norm_eps=c["rms_norm_eps"],
                  tie_embeddings=c["tie_word_embeddings"], attention_bias=c["attention_bias"],
                  mlp_bias=c["mlp_bias"], sliding_window=c["sliding_window"],
                  dropout=c["attention_dropout"], init_std=c["initializer_range"], **overrides)


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` of a Hugging Face ``LlamaForCausalLM`` equal to ``cfg`` (a
    ``MistralForCausalLM`` with a ``sliding_window``)."""
    if cfg.attn_logit_softcapping is not None:
        raise ValueError("to_hf: attn_logit_softcapping has no Hugging Face Llama or Mistral "
                         "equivalent")
    defaults, arch = HF_DEFAULTS, "LlamaForCausalLM"
    if cfg.sliding_window is not None:
        if cfg.attention_bias or cfg.mlp_bias:
            raise ValueError("to_hf: a sliding_window model is written as Mistral, which has "
                             "no attention_bias or mlp_bias")
        defaults, arch = MISTRAL_DEFAULTS, "MistralForCausalLM"
    rope = _rope_to_hf(cfg)
    return dict(defaults, architectures=[arch], sliding_window=cfg.sliding_window,
                vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_parameters=rope,
                rope_scaling=None if cfg.rope_scaling is None else rope,
                tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
                mlp_bias=cfg.mlp_bias, attention_dropout=cfg.dropout,
                initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None)


def hf_layout(cfg: Config, head: bool) -> _hf.Layout:
    """Where each parameter lives in a Hugging Face Llama checkpoint (``head`` unused: the
    config says whether ``lm_head`` is tied)."""
    del head
    t = _hf.Layout(HF_PREFIX, ignore=("*rotary_emb.inv_freq",),
                   tied={"lm_head.weight": "embed_tokens.weight"} if cfg.tie_embeddings else {})
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    t.add("embed", "embed_tokens.weight")
    for i in range(cfg.n_layer):
        b, h = f"blocks/{i}", f"layers.{i}"
        attn, mlp = f"{h}.self_attn", f"{h}.mlp"
        t.add(f"{b}/attn_norm/scale", f"{h}.input_layernorm.weight")
        t.fused_linear(f"{b}/attn/qkv", [f"{attn}.{x}_proj" for x in "qkv"], [q, kv, kv],
                       bias=cfg.attention_bias)
        t.linear(f"{b}/attn/out", f"{attn}.o_proj", bias=cfg.attention_bias)
        t.add(f"{b}/mlp_norm/scale", f"{h}.post_attention_layernorm.weight")
        t.fused_linear(f"{b}/mlp/gate_up", [f"{mlp}.gate_proj", f"{mlp}.up_proj"],
                       [cfg.hidden_dim] * 2, bias=cfg.mlp_bias)
        t.linear(f"{b}/mlp/down", f"{mlp}.down_proj", bias=cfg.mlp_bias)
    t.add("norm/scale", "norm.weight")
    if not cfg.tie_embeddings:
        t.linear("lm_head", "lm_head", bias=False)
    return t


def from_hf(model_or_state_dict, config=None, **overrides):
    """``(llama, params, cfg)`` from a Hugging Face ``LlamaForCausalLM`` or its state dict
    (then ``config``: a ``LlamaConfig``, its ``config.json`` dict or our ``Config``). Raises
    naming every missing, unused or misshapen tensor. ``overrides`` set ``Config`` fields such
    as ``param_dtype``."""
    return _hf.from_hf(sys.modules[__name__], model_or_state_dict, config, overrides)
