"""Llama family: RoPE (with Llama 3 / linear frequency scaling), RMSNorm, SwiGLU, grouped-query
attention, untied or tied output head.

``params = init(key, cfg)``; ``logits = apply(params, tokens, cfg)``; for generation,
``init_cache`` + ``apply_cached``; ``from_hf`` converts a Hugging Face ``LlamaForCausalLM``.
"""

from __future__ import annotations

import dataclasses

import jax

from transformax import nn
from transformax.models import _common
from transformax.models._hf import HFTensors, resolve_config

num_params = _common.num_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(nn.Precision):
    """Llama hyperparameters; the defaults are Hugging Face's ``LlamaConfig()`` (Llama 2 7B).
    ``head_dim`` defaults to ``dim // n_head``; ``hidden_dim`` is the SwiGLU width."""

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
          train: bool = False, rng: jax.Array | None = None) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` (``cfg.output_dtype``) for int ``tokens (B, T)``.

    ``attention_mask (B, T)``: nonzero for real tokens, 0 for padding keys (positions stay
    ``0..T-1``). ``train=True`` applies ``cfg.dropout`` with keys drawn from ``rng``.
    """
    return _common.decoder_apply(_forward, params, tokens, cfg, "max_seq_len", attention_mask,
                                 train, rng)


def init_cache(cfg: Config, batch: int, max_len: int) -> nn.KVCache:
    """An empty KV cache (``n_kv_head`` heads) for ``batch`` rows of ``max_len <= max_seq_len``."""
    return _common.init_cache(cfg, batch, max_len, "max_seq_len", cfg.n_kv_head, cfg.head_dim)


def apply_cached(params: dict, tokens: jax.Array, cfg: Config, cache: nn.KVCache, *,
                 lengths: jax.Array | None = None) -> tuple[jax.Array, nn.KVCache]:
    """As :func:`transformax.models.gpt.apply_cached`: logits for ``tokens`` continuing each
    row of ``cache``, and the updated cache (``pos`` advanced by ``lengths``, default ``T``)."""
    return _common.apply_cached(_forward, params, tokens, cfg, cache, lengths)


def _forward(params, tokens, positions, cfg, *, mask, is_causal, cache, train, rng):
    policy = cfg.policy
    p = policy.cast_to_compute(params)
    rate = cfg.dropout if train else 0.0
    keys = iter(_common.dropout_keys(rng, rate, 1 + 3 * cfg.n_layer))
    eps = cfg.norm_eps
    rope = nn.rope_angles(positions, nn.inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                             cfg.rope_scaling))
    x = nn.dropout(nn.embed(p["embed"], tokens), rate, next(keys))
    kvs = []
    for i, blk in enumerate(p["blocks"]):
        h, kv = nn.self_attention(
            blk["attn"], nn.rms_norm(blk["attn_norm"], x, eps=eps), n_head=cfg.n_head,
            n_kv_head=cfg.n_kv_head, rope=rope, mask=mask, is_causal=is_causal,
            dropout_rate=rate, dropout_rng=next(keys), **_common.layer_cache(cache, i))
        x = x + nn.dropout(h, rate, next(keys))
        x = x + nn.dropout(nn.swiglu(blk["mlp"], nn.rms_norm(blk["mlp_norm"], x, eps=eps)), rate,
                           next(keys))
        kvs.append(kv)
    x = nn.rms_norm(p["norm"], x, eps=eps)
    logits = nn.unembed(p["embed"], x) if cfg.tie_embeddings else nn.linear(p["lm_head"], x)
    return policy.cast_to_output(logits), kvs


def _rope_from_hf(hf_cfg) -> tuple[float, nn.RopeScaling | None]:
    """``(theta, scaling)`` from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` (transformers 4)."""
    rope = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    rope.update(getattr(hf_cfg, "rope_scaling", None) or {})
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


def config_from_hf(hf_cfg, **overrides) -> Config:
    """Our ``Config`` for a Hugging Face ``LlamaConfig`` (``overrides`` e.g. dtypes)."""
    if hf_cfg.hidden_act != "silu":
        raise ValueError(f"from_hf: hidden_act={hf_cfg.hidden_act!r} is not supported (silu)")
    theta, scaling = _rope_from_hf(hf_cfg)
    return Config(vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.num_hidden_layers,
                  n_head=hf_cfg.num_attention_heads,
                  n_kv_head=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
                  dim=hf_cfg.hidden_size, hidden_dim=hf_cfg.intermediate_size,
                  head_dim=getattr(hf_cfg, "head_dim", None),
                  max_seq_len=hf_cfg.max_position_embeddings, rope_theta=theta,
                  rope_scaling=scaling, norm_eps=hf_cfg.rms_norm_eps,
                  tie_embeddings=hf_cfg.tie_word_embeddings,
                  attention_bias=getattr(hf_cfg, "attention_bias", False),
                  mlp_bias=getattr(hf_cfg, "mlp_bias", False),
                  dropout=hf_cfg.attention_dropout, init_std=hf_cfg.initializer_range, **overrides)


def from_hf(model_or_state_dict, config=None, **overrides) -> tuple[dict, Config]:
    """``(params, cfg)`` from a Hugging Face ``LlamaForCausalLM`` or its state dict (then
    ``config``: a ``LlamaConfig`` or our ``Config``). Raises naming any missing or misshapen
    tensor. ``overrides`` set ``Config`` fields such as ``param_dtype``."""
    cfg = resolve_config(model_or_state_dict, config, Config, config_from_hf, overrides)
    t = HFTensors(model_or_state_dict, "model.", cfg.policy.param_dtype)
    d, hd = cfg.dim, cfg.head_dim

    def block(i):
        pre = f"layers.{i}"
        q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
        attn, mlp = f"{pre}.self_attn", f"{pre}.mlp"
        return {"attn_norm": {"scale": t.get(f"{pre}.input_layernorm.weight", (d,))},
                "attn": {"qkv": t.fused_linear([f"{attn}.q_proj", f"{attn}.k_proj",
                                                f"{attn}.v_proj"], d, [q, kv, kv],
                                               bias=cfg.attention_bias),
                         "out": t.linear(f"{attn}.o_proj", q, d, bias=cfg.attention_bias)},
                "mlp_norm": {"scale": t.get(f"{pre}.post_attention_layernorm.weight", (d,))},
                "mlp": {"gate_up": t.fused_linear([f"{mlp}.gate_proj", f"{mlp}.up_proj"], d,
                                                  [cfg.hidden_dim] * 2, bias=cfg.mlp_bias),
                        "down": t.linear(f"{mlp}.down_proj", cfg.hidden_dim, d,
                                         bias=cfg.mlp_bias)}}

    params = {"embed": t.get("embed_tokens.weight", (cfg.vocab_size, d)),
              "blocks": [block(i) for i in range(cfg.n_layer)],
              "norm": {"scale": t.get("norm.weight", (d,))}}
    if not cfg.tie_embeddings:
        params["lm_head"] = t.linear("lm_head", d, cfg.vocab_size, bias=False)
    return params, cfg
