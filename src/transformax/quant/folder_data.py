"""Calibration data for ``"int8-static"`` from what a model folder already has: a training run's
own corpus (its ``data`` config, training split, its tokenizer, its seed) or, for a Hugging Face
model folder with a tokenizer, the default embedded corpus (the standard library's ``.py``
bytes, :mod:`transformax.train.data`) encoded by that tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

BATCHES, ROWS, MAX_LEN = 4, 8, 128  # 4 batches of 8 windows of up to 128 tokens


@functools.partial(jax.jit, static_argnames=("module", "cfg"))
def _apply(params, batch, module, cfg):
    return module.apply(params, batch, cfg)


def _windows(stream: np.ndarray, encode, n: int, length: int, seed: int) -> np.ndarray:
    """``n`` windows of ``length`` tokens at random offsets of ``stream`` (token ids, or bytes
    that ``encode`` turns into ids)."""
    rng = np.random.default_rng([seed, 2])
    rows = []
    while len(rows) < n:
        start = int(rng.integers(0, max(1, len(stream) - 8 * length)))
        chunk = stream[start:start + 8 * length]
        ids = np.asarray(chunk if encode is None else
                         encode(bytes(chunk).decode("utf-8", errors="ignore")), np.int32)
        if len(ids) >= length:
            rows.append(ids[:length])
    return np.stack(rows)


def folder_calibration(path: str | Path, module, cfg, tokenizer=None, *, batches: int = BATCHES,
                       rows: int = ROWS):
    """``calibration=(fn, batches)`` for ``quant.quantize`` of a model loaded from ``path``:
    ``batches`` int32 ``(rows, T)`` token windows run through ``module.apply(params, tokens,
    cfg)``. A run folder (``config.yaml``): its training split, ``T = data.seq_len`` (at most
    128). A model folder: the default corpus encoded by ``tokenizer`` (needed), ``T = 128`` or
    the model's context if shorter."""
    from transformax.train import config as config_lib
    from transformax.train import data as data_lib
    from transformax.train import sources

    path = Path(path)
    if (path / "config.yaml").exists():
        run = config_lib.load(str(path / "config.yaml"))
        data, seed, length = run.data, run.seed, min(run.data.seq_len, MAX_LEN)
        tokenizer = sources.saved_tokenizer(path, data)  # None: a .bin corpus of ids
    elif tokenizer is None:
        raise ValueError(f"int8-static calibrates on text, and {path} has no tokenizer to "
                         f"encode it (use a run folder, add a tokenizer.json, or "
                         f"int8-dynamic)")
    else:
        data, seed = config_lib.DataConfig(), 0
        length = min(MAX_LEN, cfg.max_len)
    stream = data_lib.load_corpus(data).train
    encode = None if tokenizer is None else tokenizer.encode
    tokens = _windows(stream, encode, batches * rows, length, seed).reshape(batches, rows, -1)
    return functools.partial(_apply, module=module, cfg=cfg), list(tokens)
