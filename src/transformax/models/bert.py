"""BERT: bidirectional post-LayerNorm encoder with learned positions, token types and a padding
mask; a masked-language-model head tied to the word embedding.

``params = init(key, cfg)``; ``hidden = apply(params, tokens, cfg, attention_mask=...)``;
``logits = mlm_logits(params, hidden, cfg)``; ``from_hf`` converts a Hugging Face
``BertModel`` (no MLM head) or ``BertForMaskedLM``. The pooler is not part of the model.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp

from transformax import attention, nn
from transformax.models import _common, _hf
from transformax.models.decoder import document_positions

num_params = _common.num_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(nn.Precision):
    """BERT hyperparameters; the defaults are BERT-base (Hugging Face's ``BertConfig()``).
    ``max_len`` is ``max_position``; no GQA (``n_kv_head == n_head``)."""

    max_len_field: ClassVar[str] = "max_position"

    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def max_len(self) -> int:
        return self.max_position

    @property
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


def init(key: jax.Array, cfg: Config) -> dict:
    """Parameters (with the MLM head): Normal(0, init_std) weights, zero biases, unit
    LayerNorm scales."""
    dtype, d, std = cfg.policy.param_dtype, cfg.dim, cfg.init_std
    k_word, k_pos, k_type, k_mlm, *k_blocks = jax.random.split(key, 4 + cfg.n_layer)

    def block(k):
        k_attn, k_mlp = jax.random.split(k)
        return {"attn": nn.attention_init(k_attn, d, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                                          std=std, dtype=dtype),
                "attn_norm": nn.layer_norm_init(d, dtype=dtype),
                "mlp": nn.gelu_mlp_init(k_mlp, d, cfg.hidden_dim, std=std, dtype=dtype),
                "mlp_norm": nn.layer_norm_init(d, dtype=dtype)}

    return {"embed": {"word": nn.embedding_init(k_word, cfg.vocab_size, d, std=std, dtype=dtype),
                      "position": nn.embedding_init(k_pos, cfg.max_position, d, std=std,
                                                    dtype=dtype),
                      "token_type": nn.embedding_init(k_type, cfg.type_vocab_size, d, std=std,
                                                      dtype=dtype),
                      "norm": nn.layer_norm_init(d, dtype=dtype)},
            "blocks": [block(k) for k in k_blocks],
            "mlm": {"transform": nn.linear_init(k_mlm, d, d, std=std, dtype=dtype),
                    "norm": nn.layer_norm_init(d, dtype=dtype),
                    "bias": jnp.zeros((cfg.vocab_size,), dtype)}}


def apply(params: dict, tokens: jax.Array, cfg: Config, *, attention_mask: jax.Array | None = None,
          token_type_ids: jax.Array | None = None, document_ids: jax.Array | None = None,
          train: bool = False, rng: jax.Array | None = None,
          check_ids: bool = False) -> jax.Array:
    """Final hidden states ``(B, T, dim)`` (``cfg.output_dtype``) for int ``tokens (B, T)``.

    ``attention_mask (B, T)``: nonzero for real tokens, 0 for padding (padding keys are masked;
    padding rows still get hidden states). ``token_type_ids (B, T)`` default to 0.
    ``document_ids (B, T)``: packed documents (runs of equal ids) that do not see each other,
    positions counted from each one's start.
    ``train=True`` applies ``cfg.dropout`` with keys drawn from ``rng``. Ids outside the
    vocabularies raise; inside ``jit`` only with ``check_ids=True`` (unchecked, an id too large
    embeds as NaN and a negative one wraps round).
    """
    _common.check_tokens(tokens, cfg)
    _common.check_token_ids(tokens, cfg.vocab_size, traced=check_ids)
    for name, ids in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask),
                      ("document_ids", document_ids)):
        if ids is not None:
            _common.check_same_shape(name, ids, tokens)
    if token_type_ids is not None:
        _common.check_token_ids(token_type_ids, cfg.type_vocab_size, "token_type_ids",
                                traced=check_ids)
    mask = None if attention_mask is None else attention.key_padding(attention_mask.astype(bool))
    if document_ids is not None:
        documents = attention.document_mask(document_ids)
        mask = documents if mask is None else mask & documents
    policy = cfg.policy
    p = policy.cast_to_compute(params)
    rate = cfg.dropout if train else 0.0
    keys = iter(_common.dropout_keys(rng, rate, 1 + 3 * cfg.n_layer))
    eps = cfg.layer_norm_eps
    emb = p["embed"]
    positions = (emb["position"][:tokens.shape[1]] if document_ids is None
                 else emb["position"][document_positions(document_ids)])
    x = nn.embed(emb["word"], tokens) + positions
    x = x + (emb["token_type"][0] if token_type_ids is None
             else nn.embed(emb["token_type"], token_type_ids))
    x = nn.dropout(nn.layer_norm(emb["norm"], x, eps=eps), rate, next(keys))
    for blk in p["blocks"]:
        h, _ = nn.self_attention(blk["attn"], x, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                                 mask=mask, dropout_rate=rate, dropout_rng=next(keys))
        x = nn.layer_norm(blk["attn_norm"], x + nn.dropout(h, rate, next(keys)), eps=eps)
        h = nn.gelu_mlp(blk["mlp"], x, approximate=False)
        x = nn.layer_norm(blk["mlp_norm"], x + nn.dropout(h, rate, next(keys)), eps=eps)
    return policy.cast_to_output(x)


def mlm_logits(params: dict, hidden: jax.Array, cfg: Config) -> jax.Array:
    """Masked-LM logits ``(B, T, vocab_size)`` from ``apply``'s hidden states: dense, GELU,
    LayerNorm, then the word embedding (tied) plus a bias."""
    if "mlm" not in params:
        raise ValueError("params have no 'mlm' head (converted from a BertModel? convert a "
                         "BertForMaskedLM, or init() one)")
    policy = cfg.policy
    p = policy.cast_to_compute({"mlm": params["mlm"], "word": params["embed"]["word"]})
    x = jax.nn.gelu(nn.linear(p["mlm"]["transform"], hidden.astype(policy.compute_dtype)),
                    approximate=False)
    x = nn.layer_norm(p["mlm"]["norm"], x, eps=cfg.layer_norm_eps)
    return policy.cast_to_output(nn.unembed(p["word"], x) + p["mlm"]["bias"])


HF_PREFIX = "bert."
HF_DEFAULTS = dict(model_type="bert", vocab_size=30522, hidden_size=768,
                   num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                   max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                   initializer_range=0.02, position_embedding_type="absolute")


def config_from_hf(hf_cfg, **overrides) -> Config:
    """Our ``Config`` for a Hugging Face ``BertConfig`` or its ``config.json`` dict
    (``overrides`` e.g. dtypes)."""
    c = _hf.hf_config(hf_cfg, HF_DEFAULTS)
    if c["hidden_act"] != "gelu":
        raise ValueError(f"from_hf: hidden_act={c['hidden_act']!r} is not supported (gelu)")
    if c["position_embedding_type"] != "absolute":
        raise ValueError(f"from_hf: position_embedding_type={c['position_embedding_type']!r} "
                         f"is not supported (absolute)")
    return Config(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                  n_head=c["num_attention_heads"], dim=c["hidden_size"],
                  hidden_dim=c["intermediate_size"], max_position=c["max_position_embeddings"],
                  type_vocab_size=c["type_vocab_size"], layer_norm_eps=c["layer_norm_eps"],
                  dropout=c["hidden_dropout_prob"], init_std=c["initializer_range"],
                  **overrides)


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` of a Hugging Face ``BertForMaskedLM`` equal to ``cfg`` (``AutoModel``
    reads it as a ``BertModel``)."""
    return dict(HF_DEFAULTS, architectures=["BertForMaskedLM"],
                vocab_size=cfg.vocab_size, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, hidden_size=cfg.dim,
                intermediate_size=cfg.hidden_dim, max_position_embeddings=cfg.max_position,
                type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps,
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                initializer_range=cfg.init_std, tie_word_embeddings=True)


def hf_layout(cfg: Config, head: bool) -> _hf.Layout:
    """Where each parameter lives in a Hugging Face ``BertForMaskedLM`` (``head``) or
    ``BertModel`` checkpoint; the pooler and the next-sentence head are skipped."""
    t = _hf.Layout(HF_PREFIX, base_only=not head,
                   tied={"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
                         "cls.predictions.decoder.bias": "cls.predictions.bias"},
                   ignore=("pooler.*", "cls.seq_relationship.*", "embeddings.position_ids",
                           "embeddings.token_type_ids"))
    d = cfg.dim
    for name in ("word", "position", "token_type"):
        t.add(f"embed/{name}", f"embeddings.{name}_embeddings.weight")
    t.layer_norm("embed/norm", "embeddings.LayerNorm")
    for i in range(cfg.n_layer):
        b, h = f"blocks/{i}", f"encoder.layer.{i}"
        t.fused_linear(f"{b}/attn/qkv", [f"{h}.attention.self.{x}" for x in ("query", "key",
                                                                             "value")],
                       [d] * 3, bias=True)
        t.linear(f"{b}/attn/out", f"{h}.attention.output.dense")
        t.layer_norm(f"{b}/attn_norm", f"{h}.attention.output.LayerNorm")
        t.linear(f"{b}/mlp/fc", f"{h}.intermediate.dense")
        t.linear(f"{b}/mlp/proj", f"{h}.output.dense")
        t.layer_norm(f"{b}/mlp_norm", f"{h}.output.LayerNorm")
    if head:
        t.linear("mlm/transform", "cls.predictions.transform.dense")
        t.layer_norm("mlm/norm", "cls.predictions.transform.LayerNorm")
        t.add("mlm/bias", "cls.predictions.bias")
    return t


def from_hf(model_or_state_dict, config=None, **overrides):
    """``(bert, params, cfg)`` from a Hugging Face ``BertForMaskedLM`` (with the MLM head) or
    ``BertModel`` (without; the pooler is dropped), or a state dict of one (then ``config``: a
    ``BertConfig``, its ``config.json`` dict or our ``Config``). Raises naming every missing,
    unused or misshapen tensor."""
    return _hf.from_hf(sys.modules[__name__], model_or_state_dict, config, overrides)
