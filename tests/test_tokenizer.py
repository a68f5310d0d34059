import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from transformax import tokenizer

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()


@pytest.fixture(scope="module")
def bpe():
    return tokenizer.train_bpe(TEXT.splitlines(keepends=True), 300)


def test_bytes_round_trip():
    text = "def f(x):\n    return 'é' + \"→\"\n"
    ids = tokenizer.BYTES.encode(text)
    assert ids == list(text.encode()) and tokenizer.BYTES.vocab_size == 256
    assert tokenizer.BYTES.decode(ids) == text
    np.testing.assert_array_equal(tokenizer.BYTES.encode_corpus(text.encode()), ids)
    assert tokenizer.BYTES.decode([0xE2, 0x86]) == "\ufffd"  # a cut character


def test_bytes_as_tokenizer_json(tmp_path):
    """Written as a byte-level BPE without merges: the same ids for us and for transformers."""
    text = "def f(x):\n    return 'é→' + '\x00\x7f'  "
    path = tokenizer.BYTES.save(tmp_path)
    loaded = tokenizer.load(path)
    assert loaded.vocab_size == 256 and loaded.encode(text) == list(text.encode())
    assert loaded.decode(list(text.encode())) == text
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert fast(text)["input_ids"] == list(text.encode())


def test_bpe_round_trip_and_compression(bpe):
    assert bpe.vocab_size == 300 and bpe.name == "bpe (300 tokens)"
    sample = TEXT[:2000]
    ids = bpe.encode(sample)
    assert bpe.decode(ids) == sample
    assert max(ids) < 300 and len(ids) < 0.8 * len(sample.encode())  # 43 merges learned
    # line by line, as the corpus is encoded
    corpus = bpe.encode_corpus(sample.encode(), np.uint16)
    assert corpus.dtype == np.uint16
    assert corpus.tolist() == [i for line in sample.splitlines(True) for i in bpe.encode(line)]


def test_save_load_and_transformers_agree(bpe, tmp_path):
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    text = TEXT[5000:6000]
    assert tokenizer.load(tmp_path).encode(text) == bpe.encode(text)
    assert tokenizer.load(path).encode(text) == bpe.encode(text)
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert fast(text)["input_ids"] == bpe.encode(text)
    # GPT-2's layout: vocab.json + merges.txt
    gpt2_style = tmp_path / "gpt2"
    gpt2_style.mkdir()
    bpe.hf.model.save(str(gpt2_style))
    assert tokenizer.load(gpt2_style).encode(text) == bpe.encode(text)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=200: a byte-level BPE needs >= 257"):
        tokenizer.train_bpe(["abc"], 200)
    with pytest.raises(FileNotFoundError, match="no such tokenizer file or folder"):
        tokenizer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json \(or vocab.json \+ "
                                                r"merges.txt\) there"):
        tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        tokenizer.load(tmp_path)
