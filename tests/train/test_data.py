"""Corpora and batches as a pure function of (seed, step)."""

import numpy as np
import pytest

from transformax.train import data
from transformax.train.config import DataConfig


def test_stdlib_corpus_is_fixed_and_split():
    files = data.stdlib_files()
    assert files == data.stdlib_files()
    assert len(files) > 100
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    corpus = data.load_corpus(DataConfig())
    assert corpus.is_bytes and corpus.vocab_size == 256
    total = len(corpus.train) + len(corpus.val)
    assert len(corpus.val) == int(total * 0.05)
    assert b"def " in corpus.val[:100_000].tobytes()


def test_text_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a" * 300)
    (tmp_path / "sub" / "b.txt").write_text("b" * 300)
    cfg = DataConfig(source="text", seq_len=8, val_fraction=0.1)
    single = data.load_corpus(DataConfig(source="text", path=str(tmp_path / "a.txt"), seq_len=8))
    assert set(single.train.tobytes()) == {ord("a")}
    folder = data.load_corpus(DataConfig(**{**cfg.__dict__, "path": str(tmp_path)}))
    assert len(folder.train) + len(folder.val) == 602  # two files and the separator
    assert folder.val.tobytes().endswith(b"b" * 10)
    globbed = data.text_files(str(tmp_path / "**" / "*.txt"))
    assert [p.name for p in globbed] == ["a.txt", "b.txt"]
    with pytest.raises(ValueError, match="no files there"):
        data.text_files(str(tmp_path / "*.md"))
    with pytest.raises(ValueError, match="too few for data.seq_len=512"):
        data.load_corpus(DataConfig(source="text", path=str(tmp_path), seq_len=512))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_source(tmp_path, dtype):
    np.arange(1000, dtype=dtype).tofile(tmp_path / "train.bin")
    np.arange(1000, 1300, dtype=dtype).tofile(tmp_path / "val.bin")
    corpus = data.load_corpus(DataConfig(source="bin", path=str(tmp_path), dtype=dtype,
                                         vocab_size=1300, seq_len=16))
    assert isinstance(corpus.train, np.memmap) and not corpus.is_bytes
    assert corpus.vocab_size == 1300 and corpus.val[0] == 1000
    b = data.Batches(corpus, 0, (1, 4), 16)(3)
    assert b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # consecutive tokens
    (tmp_path / "val.bin").unlink()
    with pytest.raises(ValueError, match="val.bin"):
        data.load_corpus(DataConfig(source="bin", path=str(tmp_path), dtype=dtype,
                                    vocab_size=1300, seq_len=16))


def test_lm_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000) % 251
    batches = data.Batches(data.Corpus(tokens, tokens, 256, True), 5, (2, 3), 32)
    a, b = batches(7), batches(7)
    assert a["inputs"].shape == (2, 3, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a["targets"][..., :-1], a["inputs"][..., 1:])
    assert not np.array_equal(batches(8)["inputs"], a["inputs"])
    assert not np.array_equal(batches(7, data.EVAL)["inputs"], a["inputs"])
    other_seed = data.Batches(data.Corpus(tokens, tokens, 256, True), 6, (2, 3), 32)
    assert not np.array_equal(other_seed(7)["inputs"], a["inputs"])


def test_mlm_batch():
    tokens = np.random.default_rng(0).integers(0, 256, 100_000)
    batches = data.Batches(data.Corpus(tokens, tokens, 256, True), 0, (1, 64), 128, 0.15)
    b = batches(0)
    chosen = b["weights"] > 0
    assert abs(chosen.mean() - 0.15) < 0.01
    assert (b["inputs"][~chosen] == b["targets"][~chosen]).all()
    masked = b["inputs"][chosen] == 256
    kept = b["inputs"][chosen] == b["targets"][chosen]
    assert abs(masked.mean() - 0.8) < 0.03 and 0.07 < kept.mean() < 0.14
    assert b["inputs"].max() <= 256
    np.testing.assert_array_equal(batches(0)["inputs"], b["inputs"])


def _bin(folder, train, val=None, dtype="uint16"):
    np.asarray(train, dtype).tofile(folder / "train.bin")
    np.asarray(np.arange(100) if val is None else val, dtype).tofile(folder / "val.bin")
    return DataConfig(source="bin", path=str(folder), dtype="uint16", vocab_size=300, seq_len=8)


@pytest.mark.parametrize("setup, message", [
    (lambda d: _bin(d, np.arange(100) + 250),
     r"train.bin holds token id 300 at index 50 \(the largest is 349\), outside "
     r"data.vocab_size=300"),
    (lambda d: _bin(d, np.arange(100), np.arange(100), "uint32"),
     "every second uint16 token is 0, as when uint32 tokens are read as uint16; set "
     "data.dtype=uint32"),
    (lambda d: ((d / "train.bin").write_bytes(b"\x01\x00\x02"), _bin(d, [], np.arange(100)))[1],
     "train.bin is empty"),
    (lambda d: (_bin(d, np.arange(100)), (d / "val.bin").write_bytes(b"\x01\x00\x02"))[0],
     "val.bin has 3 bytes, not a whole number of data.dtype=uint16 tokens"),
    (lambda d: _bin(d, np.arange(5)), "the training split has 5 tokens, too few for "
                                      "data.seq_len=8"),
    (lambda d: DataConfig(source="text", path=str(d / "missing.txt")),
     "missing.txt': no such file or folder"),
    (lambda d: ((d / "empty.txt").write_text(""),
                DataConfig(source="text", path=str(d / "empty.txt"), seq_len=8))[1],
     "the training split has 0 tokens"),
])
def test_unusable_data_is_refused_naming_the_file(tmp_path, setup, message):
    with pytest.raises(data.ConfigError, match=message):
        data.load_corpus(setup(tmp_path))
