"""GPT-2: learned positions, pre-LayerNorm blocks, tanh GELU, head tied to the token embedding.

``params = init(key, cfg)``; ``logits = apply(params, tokens, cfg)``; for generation,
``init_cache`` + ``apply_cached``; ``from_hf`` converts a Hugging Face ``GPT2LMHeadModel``
(``hf_layout``: where each parameter lives there).
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
    """GPT-2 hyperparameters; the defaults are GPT-2 small (124M). The decoder contract
    (:mod:`transformax.models.decoder`): ``max_len`` is ``block_size``; no GQA, no sliding
    window, no soft-capping; the head is tied."""

    max_len_field: ClassVar[str] = "block_size"
    tie_embeddings: ClassVar[bool] = True
    sliding_window: ClassVar[None] = None
    attn_logit_softcapping: ClassVar[None] = None

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def max_len(self) -> int:
        return self.block_size

    @property
    def norm_eps(self) -> float:
        return self.layer_norm_eps


ARCH = decoder.Arch(embed="wte", position_table="wpe", attn_norm="ln_1", mlp_norm="ln_2",
                    final_norm="ln_f", norm=nn.layer_norm, mlp=nn.gelu_mlp)


def init(key: jax.Array, cfg: Config) -> dict:
    """Parameters: Normal(0, init_std) weights, residual projections scaled by
    ``1 / sqrt(2 n_layer)`` (GPT-2), zero biases, unit LayerNorm scales."""
    dtype, d = cfg.policy.param_dtype, cfg.n_embd
    k_wte, k_wpe, *k_blocks = jax.random.split(key, 2 + cfg.n_layer)
    proj_std = nn.init.residual_std(cfg.init_std, cfg.n_layer)

    def block(k):
        k_attn, k_mlp = jax.random.split(k)
        return {"ln_1": nn.layer_norm_init(d, dtype=dtype),
                "attn": nn.attention_init(k_attn, d, cfg.n_head, cfg.n_head, cfg.head_dim,
                                          std=cfg.init_std, proj_std=proj_std, dtype=dtype),
                "ln_2": nn.layer_norm_init(d, dtype=dtype),
                "mlp": nn.gelu_mlp_init(k_mlp, d, 4 * d, std=cfg.init_std, proj_std=proj_std,
                                        dtype=dtype)}

    return {"wte": nn.embedding_init(k_wte, cfg.vocab_size, d, std=cfg.init_std, dtype=dtype),
            "wpe": nn.embedding_init(k_wpe, cfg.block_size, d, std=cfg.init_std, dtype=dtype),
            "blocks": [block(k) for k in k_blocks],
            "ln_f": nn.layer_norm_init(d, dtype=dtype)}


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
    """An empty KV cache for ``batch`` rows of up to ``max_len <= block_size`` tokens."""
    return decoder.init_cache(cfg, batch, max_len)


def apply_cached(params: dict, tokens: jax.Array, cfg: Config, cache: nn.KVCache, *,
                 lengths: jax.Array | None = None,
                 check_ids: bool = False) -> tuple[jax.Array, nn.KVCache]:
    """Logits for ``tokens (B, T)`` that continue each row of ``cache`` (row ``b`` at position
    ``cache.pos[b]``), and the cache with their keys/values written. ``lengths (B,)``: how many
    of the ``T`` tokens are real in each row (right padding, default all); ``pos`` advances by
    it, so padding slots are overwritten by the next tokens. Ids outside the vocabulary and
    tokens past the cache raise; inside ``jit`` only with ``check_ids=True`` (unchecked there,
    the write is clamped into the cache and the logits are wrong)."""
    return decoder.apply_cached(ARCH, params, tokens, cfg, cache, lengths, check_ids)


HF_PREFIX = "transformer."
HF_DEFAULTS = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768,
                   n_layer=12, n_head=12, n_inner=None, activation_function="gelu_new",
                   resid_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   tie_word_embeddings=True)


def config_from_hf(hf_cfg, **overrides) -> Config:
    """Our ``Config`` for a Hugging Face ``GPT2Config`` or its ``config.json`` dict
    (``overrides`` e.g. dtypes)."""
    c = _hf.hf_config(hf_cfg, HF_DEFAULTS)
    if c["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"from_hf: activation_function={c['activation_function']!r} is not "
                         f"supported (GPT-2 uses the tanh GELU, 'gelu_new')")
    if c["n_inner"] not in (None, 4 * c["n_embd"]):
        raise ValueError(f"from_hf: n_inner={c['n_inner']} is not supported (only 4 * n_embd)")
    if c["scale_attn_by_inverse_layer_idx"] or not c["scale_attn_weights"]:
        raise ValueError("from_hf: only the standard 1/sqrt(head_dim) attention scaling is "
                         "supported")
    if not c["tie_word_embeddings"]:
        raise ValueError("from_hf: tie_word_embeddings=False is not supported (GPT-2's head is "
                         "the token embedding)")
    return Config(vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                  n_embd=c["n_embd"], block_size=c["n_positions"], dropout=c["resid_pdrop"],
                  layer_norm_eps=c["layer_norm_epsilon"], init_std=c["initializer_range"],
                  **overrides)


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` of a Hugging Face ``GPT2LMHeadModel`` equal to ``cfg``."""
    return dict(HF_DEFAULTS, architectures=["GPT2LMHeadModel"],
                vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                layer_norm_epsilon=cfg.layer_norm_eps, initializer_range=cfg.init_std,
                bos_token_id=None, eos_token_id=None)


def hf_layout(cfg: Config, head: bool) -> _hf.Layout:
    """Where each parameter lives in a Hugging Face GPT-2 checkpoint (``head`` unused: tied)."""
    del head
    t = _hf.Layout(HF_PREFIX, tied={"lm_head.weight": "wte.weight"},
                   ignore=("h.*.attn.bias", "h.*.attn.masked_bias"))
    t.add("wte", "wte.weight")
    t.add("wpe", "wpe.weight")
    for i in range(cfg.n_layer):
        b, h = f"blocks/{i}", f"h.{i}"
        t.layer_norm(f"{b}/ln_1", f"{h}.ln_1")
        t.linear(f"{b}/attn/qkv", f"{h}.attn.c_attn", conv1d=True)
        t.linear(f"{b}/attn/out", f"{h}.attn.c_proj", conv1d=True)
        t.layer_norm(f"{b}/ln_2", f"{h}.ln_2")
        t.linear(f"{b}/mlp/fc", f"{h}.mlp.c_fc", conv1d=True)
        t.linear(f"{b}/mlp/proj", f"{h}.mlp.c_proj", conv1d=True)
    t.layer_norm("ln_f", "ln_f")
    return t


def from_hf(model_or_state_dict, config=None, **overrides):
    """``(gpt, params, cfg)`` from a Hugging Face ``GPT2LMHeadModel`` / ``GPT2Model`` or its state
    dict (then ``config``: a ``GPT2Config``, its ``config.json`` dict or our ``Config``).
    Raises naming every missing, unused or misshapen tensor. ``overrides`` set ``Config`` fields
    such as ``param_dtype``."""
    return _hf.from_hf(sys.modules[__name__], model_or_state_dict, config, overrides)
