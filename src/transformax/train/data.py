"""Training data: token streams and batches that are a pure function of ``(seed, step)``.

Sources (``data.source``): ``stdlib``, the bytes of the running Python's standard library
``.py`` files (embedded, nothing to download); ``text``, the bytes of the files a path, folder or
glob names; ``bin``, nanoGPT-style ``train.bin`` / ``val.bin`` token files (memory-mapped).
Byte sources are concatenated in a fixed file order and their tail is held out; each file is a
document. A ``.bin`` stream's documents end at each ``data.eos_id`` token (``data.packing``: no
token attends across a document boundary).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from transformax.train.config import ConfigError, DataConfig

TRAIN, EVAL = 0, 1  # the two random streams: training batches, held-out batches


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams (1-D arrays) and their vocabulary; ``is_bytes``: tokens are UTF-8 bytes;
    ``starts``: each split's document start offsets (sorted, from 0), ``None`` if unknown."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    is_bytes: bool
    starts: tuple[np.ndarray, np.ndarray] | None = None

    def split(self, stream: int) -> np.ndarray:
        return self.train if stream == TRAIN else self.val

    def documents(self, stream: int) -> np.ndarray:
        """The document start offsets of a split (see :attr:`starts`)."""
        return self.starts[0 if stream == TRAIN else 1]


def load_corpus(cfg: DataConfig) -> Corpus:
    """The token streams ``cfg`` describes; raises :class:`ConfigError` naming the path and the
    problem if unusable (missing, unreadable, empty, too short, a ``.bin`` whose size or token
    ids do not fit ``data.dtype`` / ``data.vocab_size``)."""
    if cfg.source == "bin":
        corpus = _bin_corpus(Path(cfg.path), np.dtype(cfg.dtype), cfg.vocab_size,
                             cfg.eos_id if cfg.packing else None)
    else:
        files = stdlib_files() if cfg.source == "stdlib" else text_files(cfg.path)
        try:
            data, starts = _read_bytes(tuple(files))
        except OSError as e:
            raise ConfigError(f"data.path={cfg.path!r}: cannot read {e.filename} "
                              f"({e.strerror})") from None
        n_train = len(data) - max(1, int(len(data) * cfg.val_fraction))
        val_starts = np.unique(np.concatenate([[0], starts[starts > n_train] - n_train]))
        corpus = Corpus(data[:n_train], data[n_train:], 256, True,
                        (starts[starts < n_train], val_starts))
    for name, split in (("training", corpus.train), ("held-out", corpus.val)):
        if len(split) <= cfg.seq_len + 1:
            raise ConfigError(f"data.path={cfg.path!r}: the {name} split has {len(split)} "
                              f"tokens, too few for data.seq_len={cfg.seq_len} (needs more "
                              f"than {cfg.seq_len + 1})")
    return corpus


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (no site-packages), ordered by the CRC32 of their
    relative path: deterministic, and mixed across packages so the held-out tail is a fair
    sample."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):  # not into site-packages (~30x the files)
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: (zlib.crc32(str(p.relative_to(root)).encode()), str(p)))


def text_files(pattern: str) -> list[Path]:
    """The files a path names: a file, every file under a folder, or a glob; sorted."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(pattern):
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    else:
        raise ConfigError(f"data.path={pattern!r}: no such file or folder")
    if not files:
        raise ConfigError(f"data.path={pattern!r}: no files there")
    return sorted(files)


@functools.lru_cache(maxsize=2)
def _read_bytes(files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The files' bytes joined by blank lines, and where each file starts."""
    contents = [p.read_bytes() for p in files]
    data = np.frombuffer(b"\n\n".join(contents), np.uint8)
    data.flags.writeable = False
    starts = np.cumsum([0] + [len(c) + 2 for c in contents[:-1]])
    return data, starts


def _bin_corpus(folder: Path, dtype: np.dtype, vocab_size: int, eos_id: int | None) -> Corpus:
    """``train.bin`` and ``val.bin``; with ``eos_id``, their documents (each ends at one)."""
    splits = [_bin_tokens(folder / name, dtype, vocab_size) for name in ("train.bin", "val.bin")]
    starts = None if eos_id is None else tuple(document_starts(x, eos_id) for x in splits)
    return Corpus(*splits, vocab_size, False, starts)


def document_starts(tokens: np.ndarray, eos_id: int, chunk: int = 1 << 24) -> np.ndarray:
    """Where the documents of a token stream start: 0 and after every ``eos_id`` (but the last
    token), read ``chunk`` tokens at a time (a memory-mapped corpus is never loaded whole)."""
    found = [np.flatnonzero(tokens[i:i + chunk] == eos_id) + (i + 1)
             for i in range(0, len(tokens) - 1, chunk)]
    starts = np.concatenate([[0], *found]).astype(np.int64)
    return starts[starts < len(tokens)]


def _bin_tokens(path: Path, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    """The tokens of one ``.bin`` file, memory-mapped, after checking that its size and token
    ids fit ``data.dtype`` and ``data.vocab_size``."""
    where = f"data.path={str(path.parent)!r}: {path.name}"
    if not path.is_file():
        raise ConfigError(f"data.path={str(path.parent)!r}: expected {path.name} there "
                          f"(nanoGPT layout: train.bin and val.bin)")
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"{where} is empty")
    if size % dtype.itemsize:
        raise ConfigError(f"{where} has {size} bytes, not a whole number of data.dtype="
                          f"{dtype.name} tokens ({dtype.itemsize} bytes each)")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    top = int(tokens.max())
    if top >= vocab_size:
        first = int(np.argmax(tokens >= vocab_size))
        raise ConfigError(f"{where} holds token id {tokens[first]} at index {first} (the "
                          f"largest is {top}), outside data.vocab_size={vocab_size}; is "
                          f"data.dtype={dtype.name} the dtype it was written with?")
    if dtype == np.uint16 and len(tokens) >= 16 and not tokens[1::2].any():
        raise ConfigError(f"{where}: every second uint16 token is 0, as when uint32 tokens are "
                          f"read as uint16; set data.dtype=uint32")
    return tokens


def _rng(seed: int, stream: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def _windows(tokens: np.ndarray, rng: np.random.Generator, n: int,
             length: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random windows of ``length`` tokens, int32, and their start offsets."""
    starts = rng.integers(0, len(tokens) - length, size=n)
    return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32), starts


def lm_batch(tokens: np.ndarray, *, seed: int, stream: int, step: int, shape: tuple[int, int],
             seq_len: int, documents: np.ndarray | None = None) -> dict:
    """Next-token batch: ``inputs`` and ``targets`` (shifted by one), int32 of
    ``shape + (seq_len,)`` where ``shape = (micro_batches, micro_batch_size)``.

    ``documents`` (the stream's document start offsets): packed sequences, with
    ``document_ids`` (int32, counting the documents of each row from 0) and ``weights`` (0.0
    where the target starts another document, so it is not scored)."""
    w, offsets = _windows(tokens, _rng(seed, stream, step), shape[0] * shape[1], seq_len + 1)
    w = w.reshape(*shape, seq_len + 1)
    batch = {"inputs": w[..., :-1], "targets": w[..., 1:]}
    if documents is None:
        return batch
    ids = _document_ids(documents, offsets, seq_len + 1).reshape(*shape, seq_len + 1)
    return {**batch, "document_ids": ids[..., :-1],
            "weights": (ids[..., 1:] == ids[..., :-1]).astype(np.float32)}


def _document_ids(documents: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """int32 ``(len(offsets), length)``: each window's documents, counted from 0 per row."""
    doc = np.searchsorted(documents, offsets[:, None] + np.arange(length), side="right")
    return (doc - doc[:, :1]).astype(np.int32)


def mlm_batch(tokens: np.ndarray, *, seed: int, stream: int, step: int, shape: tuple[int, int],
              seq_len: int, vocab_size: int, mask_id: int, probability: float,
              documents: np.ndarray | None = None) -> dict:
    """Masked-LM batch (BERT): of the ``probability`` share of positions chosen, 80% become
    ``mask_id``, 10% a random token below ``vocab_size``, 10% stay. ``targets`` are the original
    tokens, ``weights`` 1.0 at the chosen positions. ``documents`` (the stream's document start
    offsets): packed sequences, with ``document_ids`` (as ``lm_batch``'s)."""
    rng = _rng(seed, stream, step)
    targets, offsets = _windows(tokens, rng, shape[0] * shape[1], seq_len)
    targets = targets.reshape(*shape, seq_len)
    chosen = rng.random(targets.shape) < probability
    action = rng.random(targets.shape)
    inputs = np.where(chosen & (action < 0.8), mask_id, targets)
    random_tokens = rng.integers(0, vocab_size, targets.shape, dtype=np.int32)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    batch = {"inputs": inputs.astype(np.int32), "targets": targets,
             "weights": chosen.astype(np.float32)}
    if documents is None:
        return batch
    return {**batch, "document_ids": _document_ids(documents, offsets, seq_len).reshape(
        *shape, seq_len)}


@dataclasses.dataclass(frozen=True)
class Batches:
    """``batches(step, stream)``: the batch for a training step (``TRAIN``) or the ``step``-th
    held-out batch (``EVAL``), shaped ``(grad_accum, batch_size // grad_accum, seq_len)``."""

    corpus: Corpus
    seed: int
    shape: tuple[int, int]
    seq_len: int
    mlm_probability: float | None = None  # set: masked-LM batches with [MASK] = vocab_size
    packing: bool = False  # batches of packed documents, with their ``document_ids``

    def __call__(self, step: int, stream: int = TRAIN) -> dict:
        tokens = self.corpus.split(stream)
        documents = self.corpus.documents(stream) if self.packing else None
        if self.mlm_probability is None:
            return lm_batch(tokens, seed=self.seed, stream=stream, step=step, shape=self.shape,
                            seq_len=self.seq_len, documents=documents)
        return mlm_batch(tokens, seed=self.seed, stream=stream, step=step, shape=self.shape,
                         seq_len=self.seq_len, vocab_size=self.corpus.vocab_size,
                         mask_id=self.corpus.vocab_size, probability=self.mlm_probability,
                         documents=documents)
