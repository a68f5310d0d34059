"""Text <-> token ids: UTF-8 bytes, or a Hugging Face ``tokenizers`` tokenizer (no
``transformers``).

``load(path)`` reads a ``tokenizer.json`` (a file, or a folder holding one, or a GPT-2 style
``vocab.json`` + ``merges.txt``); ``train_bpe(texts, vocab_size)`` learns a byte-level BPE;
``Tokenizer.save(folder)`` writes ``tokenizer.json`` that both read back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"  # the one special token of a trained BPE


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """``hf=None``: UTF-8 bytes (ids 0..255); else the wrapped ``tokenizers.Tokenizer``."""

    hf: tokenizers.Tokenizer | None = None

    @property
    def vocab_size(self) -> int:
        return 256 if self.hf is None else self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def name(self) -> str:
        return "bytes" if self.hf is None else f"bpe ({self.vocab_size} tokens)"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's own special tokens, e.g. a BOS)."""
        if self.hf is None:
            return list(text.encode())
        return self.hf.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens skipped; invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if self.hf is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=True)

    def encode_corpus(self, data: bytes | np.ndarray, dtype=np.uint32) -> np.ndarray:
        """A long UTF-8 text (bytes) as one 1-D id array, encoded line by line in parallel
        without special tokens."""
        if self.hf is None:
            return np.frombuffer(bytes(data), np.uint8).astype(dtype)
        lines = bytes(data).decode("utf-8", errors="replace").splitlines(keepends=True)
        encoded = self.hf.encode_batch(lines, add_special_tokens=False)
        return np.fromiter((i for e in encoded for i in e.ids), dtype)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.json`` (bytes: a byte-level BPE without merges, the same ids
        for ``transformers`` and ``load``); returns its path."""
        path = Path(folder) / FILE
        (self.hf or _bytes_as_bpe()).save(str(path))
        return path


BYTES = Tokenizer()


def load(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path``: a ``tokenizer.json`` file, or a folder with one (or with
    GPT-2's ``vocab.json`` + ``merges.txt``)."""
    path = Path(path)
    if path.is_dir() and (path / FILE).is_file():
        path = path / FILE
    if path.is_file():
        try:
            return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
        return Tokenizer(_byte_level(tokenizers.Tokenizer(bpe)))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    raise FileNotFoundError(f"{path}: no {FILE} (or vocab.json + merges.txt) there")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (the 256 bytes, ``<|endoftext|>`` and merges)
    learned from ``texts``."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs >= 257 (256 bytes "
                         f"and {END_OF_TEXT})")
    hf = _byte_level(tokenizers.Tokenizer(models.BPE()))
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf)


def _bytes_as_bpe() -> tokenizers.Tokenizer:
    """UTF-8 bytes as a byte-level BPE: byte ``b`` is token ``b`` (GPT-2's byte-to-character
    table names the tokens), no merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return _byte_level(tokenizers.Tokenizer(models.BPE({chars[b]: b for b in range(256)}, [])))


def _byte_level(hf: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf
