"""Where a run starts from: its tokenizer (``data.tokenizer``) and its initial weights
(``model.init_from``).

``data.tokenizer``: ``bytes`` (UTF-8, 256 ids), ``bpe`` (a byte-level BPE of
``data.vocab_size`` tokens learned from the training split) or ``hf:PATH`` (a
``tokenizer.json`` or a Hugging Face folder). The run folder keeps it as ``tokenizer.json``,
used again on resume, by samples and by ``transformax-generate``.

``model.init_from``: ``hf:PATH`` (a Hugging Face model folder) or ``run:PATH`` (another run's
latest checkpoint): the model section starts from that model's config, and step 0 from its
weights (fine-tuning).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from transformax import tokenizer as tokenizer_lib
from transformax.train.config import ConfigError, DataConfig
from transformax.train.data import EVAL, TRAIN, Corpus

PREFIXES = ("hf:", "run:")


def _split(key: str, spec: str, allowed: tuple[str, ...]) -> tuple[str, Path]:
    kind, sep, path = spec.partition(":")
    if not sep or f"{kind}:" not in allowed or not path:
        raise ConfigError(f"{key}={spec!r}: expected {' | '.join(a + 'PATH' for a in allowed)}")
    return kind, Path(path)


def run_tokenizer(spec: str, vocab_size: int, run_dir: Path,
                  train_text) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer: the run folder's ``tokenizer.json`` if it has one (a resumed run),
    else as ``spec`` says (``bpe``: ``vocab_size`` tokens learned from ``train_text()``, the
    training split's UTF-8 bytes)."""
    if spec == "bytes":
        return tokenizer_lib.BYTES
    if (run_dir / tokenizer_lib.FILE).is_file():
        return tokenizer_lib.load(run_dir / tokenizer_lib.FILE)
    if spec == "bpe":
        text = bytes(train_text()).decode("utf-8", errors="replace")
        return tokenizer_lib.train_bpe(text.splitlines(keepends=True), vocab_size)
    try:
        return tokenizer_lib.load(_split("data.tokenizer", spec, ("hf:",))[1])
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={spec!r}: {e}") from None


def saved_tokenizer(run_dir: Path, cfg: DataConfig) -> tokenizer_lib.Tokenizer | None:
    """A run's tokenizer: bytes (``None`` for a ``.bin`` corpus under ``bytes``: ids, not
    text), else the run folder's ``tokenizer.json``."""
    if cfg.tokenizer == "bytes":
        return None if cfg.source == "bin" else tokenizer_lib.BYTES
    return tokenizer_lib.load(Path(run_dir) / tokenizer_lib.FILE)


def tokenize(cfg: DataConfig, corpus: Corpus,
             run_dir: Path) -> tuple[tokenizer_lib.Tokenizer | None, Corpus]:
    """The run's tokenizer (``None`` for a ``.bin`` corpus under ``bytes``: ids, not text) and
    ``corpus`` in its ids (``.bin`` corpora are ids already)."""
    if cfg.source == "bin" and cfg.tokenizer == "bytes":
        return None, corpus
    tok = run_tokenizer(cfg.tokenizer, cfg.vocab_size, run_dir, lambda: corpus.train)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"data.vocab_size={cfg.vocab_size}: the tokenizer "
                          f"{cfg.tokenizer} has {tok.vocab_size} tokens; set "
                          f"data.vocab_size={tok.vocab_size}")
    if cfg.source == "bin" or tok.hf is None:
        return tok, corpus
    dtype = np.uint16 if cfg.vocab_size <= 1 << 16 else np.uint32
    if cfg.packing:  # document by document, to know where each starts in tokens
        encoded = [_encode_documents(tok, corpus, stream, dtype) for stream in (TRAIN, EVAL)]
        splits, starts = [e[0] for e in encoded], tuple(e[1] for e in encoded)
    else:
        splits = [tok.encode_corpus(split, dtype) for split in (corpus.train, corpus.val)]
        starts = None
    for name, split in zip(("training", "held-out"), splits):
        if len(split) <= cfg.seq_len + 1:
            raise ConfigError(f"data.path={cfg.path!r}: the {name} split has {len(split)} "
                              f"{cfg.tokenizer} tokens, too few for data.seq_len={cfg.seq_len}")
    return tok, Corpus(*splits, cfg.vocab_size, False, starts)


def _encode_documents(tok: tokenizer_lib.Tokenizer, corpus: Corpus, stream: int,
                      dtype) -> tuple[np.ndarray, np.ndarray]:
    """A split's ids, encoded document by document, and each document's first id's offset."""
    text, bounds = corpus.split(stream), list(corpus.documents(stream))
    docs = [tok.encode_corpus(text[a:b], dtype) for a, b in zip(bounds, bounds[1:] + [len(text)])]
    return np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs[:-1]])


def model_fields(spec: str) -> dict:
    """The ``model`` section (``arch`` and the ``Config`` fields) of ``model.init_from``."""
    from transformax import models

    kind, path = _split("model.init_from", spec, PREFIXES)
    if kind == "run":
        config = path / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"model.init_from={spec!r}: no config.yaml in {path} (not a "
                              f"transformax-train run folder)")
        fields = OmegaConf.to_container(OmegaConf.load(config).model)
        fields.pop("init_from", None)
        return fields
    try:
        config = models.pretrained.read_config(path)
        module = models.module_for(config)
        cfg = module.config_from_hf(config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from={spec!r}: {e}") from None
    return {"arch": module.__name__.rpartition(".")[2], **dataclasses.asdict(cfg)}


def initial_params(spec: str, module, cfg) -> dict:
    """The weights ``model.init_from`` names, as ``cfg`` (the run's model config) lays them out."""
    from transformax import models

    kind, path = _split("model.init_from", spec, PREFIXES)
    try:
        if kind == "hf":
            source = models.module_for(models.pretrained.read_config(path))
            if source is not module:
                raise ValueError(f"a {source.__name__} checkpoint cannot start a "
                                 f"{module.__name__} model (model.arch)")
            return module.from_hf(models.pretrained.read_safetensors(path), cfg)[1]
        from transformax.train.loop import load_run

        return load_run(path)[1].params
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from={spec!r}: {e}") from None
