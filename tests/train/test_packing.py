"""``data.packing``: documents packed into sequences, their boundaries kept by the batches, the
loss and the attention."""

import dataclasses

import jax
import numpy as np
import pytest

from transformax import cli
from transformax.train import config, data, sources
from transformax.train.tasks import TASKS

# a stream whose every token is its document's index: documents of 5, 3, 40, 2 and 60 tokens
LENGTHS = [5, 3, 40, 2, 60]
STARTS = np.cumsum([0] + LENGTHS[:-1])
TOKENS = np.repeat(np.arange(len(LENGTHS)), LENGTHS).astype(np.uint8)
CORPUS = data.Corpus(TOKENS, TOKENS, 256, True, (STARTS, STARTS))


def test_batches_carry_document_ids_and_skip_targets_across_documents():
    batch = data.Batches(CORPUS, 0, (2, 8), 12, packing=True)(3)
    plain = data.Batches(CORPUS, 0, (2, 8), 12)(3)
    for key in ("inputs", "targets"):  # the same windows with or without packing
        np.testing.assert_array_equal(batch[key], plain[key])
    inputs, ids = batch["inputs"], batch["document_ids"]
    assert ids.dtype == np.int32 and ids.shape == inputs.shape == (2, 8, 12)
    np.testing.assert_array_equal(ids, inputs - inputs[..., :1])
    np.testing.assert_array_equal(batch["weights"], batch["targets"] == inputs)
    assert (ids[..., -1] > 0).any()  # some rows do hold several documents


def test_corpus_documents_are_the_files(tmp_path):
    for name, text in (("a.txt", "a" * 300), ("b.txt", "b" * 30), ("c.txt", "c" * 100)):
        (tmp_path / name).write_text(text)
    corpus = data.load_corpus(config.DataConfig(source="text", path=str(tmp_path), seq_len=8,
                                                val_fraction=0.2))
    np.testing.assert_array_equal(corpus.documents(data.TRAIN), [0, 302, 334])
    np.testing.assert_array_equal(corpus.documents(data.EVAL), [0])  # c.txt's tail
    assert len(corpus.train) == 334 + 100 - len(corpus.val)


def test_bpe_tokens_keep_the_document_starts(tmp_path):
    texts = ["def f(x):\n    return x\n", "import os\nprint(os.sep)\n" * 3, "class A:\n    pass\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.py").write_text(text * 4)
    cfg = config.DataConfig(source="text", path=str(tmp_path), tokenizer="bpe", vocab_size=300,
                            seq_len=4, val_fraction=0.1, packing=True)
    corpus = data.load_corpus(cfg)
    tok, packed = sources.tokenize(cfg, corpus, tmp_path / "run")
    _, plain = sources.tokenize(config.DataConfig(**{**cfg.__dict__, "packing": False}), corpus,
                                tmp_path / "run")
    np.testing.assert_array_equal(packed.train, plain.train)  # the same ids
    starts = packed.documents(data.TRAIN)
    assert len(starts) == len(corpus.documents(data.TRAIN)) == 3
    decoded = [tok.decode(packed.train[a:b]) for a, b in zip(starts, [*starts[1:], None])]
    assert decoded[:2] == [texts[0] * 4 + "\n\n", texts[1] * 4 + "\n\n"]
    assert decoded[2].startswith("class A:")  # the rest of c is held out


def test_a_documents_loss_ignores_the_others():
    """The summed loss of one document's tokens does not change when another document of the
    same packed rows changes."""
    cfg = config.load(None, ["model.arch=llama", "model.n_layer=1", "model.n_head=2",
                             "model.n_kv_head=1", "model.dim=16", "model.hidden_dim=32",
                             "model.max_seq_len=16", "data.seq_len=16", "data.packing=true"])
    task, model_cfg = cfg.task, cfg.model_config
    params = jax.jit(task.module.init, static_argnums=1)(jax.random.key(0), model_cfg)
    rng = np.random.RandomState(0)
    inputs = rng.randint(0, 256, (2, 16)).astype(np.int32)
    ids = np.array([[0] * 6 + [1] * 10, [0] * 9 + [1] * 7], np.int32)
    batch = {"inputs": inputs, "targets": rng.randint(0, 256, (2, 16)).astype(np.int32),
             "document_ids": ids, "weights": (ids == 1).astype(np.float32)}  # score document 1
    loss = jax.jit(lambda b: task.loss(params, b, model_cfg))
    other = dict(batch, inputs=np.where(ids == 0, (inputs + 3) % 256, inputs))
    assert loss(batch)[1] == 17.0
    np.testing.assert_allclose(loss(other)[0], loss(batch)[0], rtol=1e-6)
    unpacked = {k: v for k, v in batch.items() if k != "document_ids"}
    assert abs(float(loss(dict(unpacked, inputs=other["inputs"]))[0])
               - float(loss(unpacked)[0])) > 1e-3  # without document ids it does change


def test_bin_documents_end_at_each_eos_id(tmp_path):
    eos = 9
    train = np.array([1, 2, eos, 3, eos, eos, 4, 5, 6, 7, 8, 1, eos], np.uint16)
    np.testing.assert_array_equal(data.document_starts(train, eos), [0, 3, 5, 6])
    for chunk in (1, 2, 3, 5):  # eos tokens on and across chunk edges
        np.testing.assert_array_equal(data.document_starts(train, eos, chunk), [0, 3, 5, 6])
    train.tofile(tmp_path / "train.bin")
    train[::-1].tofile(tmp_path / "val.bin")
    cfg = config.load(None, ["data.source=bin", f"data.path={tmp_path}", "data.seq_len=4",
                             "data.vocab_size=16", "data.packing=true", f"data.eos_id={eos}"])
    corpus = data.load_corpus(cfg.data)
    np.testing.assert_array_equal(corpus.documents(data.TRAIN), [0, 3, 5, 6])
    np.testing.assert_array_equal(corpus.documents(data.EVAL), [0, 1, 8, 9, 11])
    batch = data.Batches(corpus, 0, (1, 8), 4, packing=True)(0)
    ids, ends = batch["document_ids"], np.cumsum(batch["inputs"] == eos, -1)
    np.testing.assert_array_equal(ids[..., 1:], ends[..., :-1])  # a new one after each eos
    np.testing.assert_array_equal(batch["weights"], batch["inputs"] != eos)
    assert data.load_corpus(dataclasses.replace(cfg.data, packing=False)).starts is None


def test_mlm_batches_carry_document_ids():
    batch = data.Batches(CORPUS, 0, (2, 8), 12, mlm_probability=0.15, packing=True)(3)
    plain = data.Batches(CORPUS, 0, (2, 8), 12, mlm_probability=0.15)(3)
    for key in ("inputs", "targets", "weights"):  # the same batch, with the ids beside it
        np.testing.assert_array_equal(batch[key], plain[key])
    targets = batch["targets"]
    np.testing.assert_array_equal(batch["document_ids"], targets - targets[..., :1])


def test_bert_packed_documents_are_as_if_alone():
    """A packed BERT row's documents get the hidden states each gets alone (no attention across
    them, positions from each one's start)."""
    cfg = config.load(None, ["model.arch=bert", "model.n_layer=1", "model.n_head=2",
                             "model.dim=16", "model.hidden_dim=32", "model.max_position=16",
                             "data.seq_len=16", "data.packing=true"])
    task, model_cfg = cfg.task, cfg.model_config
    params = jax.jit(task.module.init, static_argnums=1)(jax.random.key(0), model_cfg)
    tokens = np.random.RandomState(0).randint(0, 256, (1, 16)).astype(np.int32)
    ids = np.array([[0] * 6 + [1] * 10], np.int32)
    apply = jax.jit(lambda t, d=None: task.module.apply(params, t, model_cfg, document_ids=d))
    packed = apply(tokens, ids)
    np.testing.assert_allclose(packed[:, :6], apply(tokens[:, :6]), atol=1e-5)
    np.testing.assert_allclose(packed[:, 6:], apply(tokens[:, 6:]), atol=1e-5)
    assert not np.allclose(packed, apply(tokens), atol=1e-3)  # unpacked, they see each other


@pytest.mark.parametrize("overrides, message", [
    (["data.packing=true", "data.source=bin", "data.path=x"],
     "data.packing=True: needs document boundaries, and a .bin token stream has none of its "
     "own: set data.eos_id"),
    (["data.source=bin", "data.path=x", "data.eos_id=256"],
     r"data.eos_id=256: expected a token id in \[0, data.vocab_size=256\)"),
    (["data.eos_id=0"], "data.eos_id=0: only for data.source=bin"),
    (["data.packing=maybe"], "data.packing"),
])
def test_config_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, overrides)


@pytest.mark.parametrize("override, key", [("data.packing=maybe", "data.packing"),
                                           ("data.eos_id=-1", "data.eos_id=-1")])
def test_cli_error_is_one_line(tmp_path, capsys, override, key):
    assert cli.train_main(["data.source=bin", f"data.path={tmp_path}", override,
                           f"out_dir={tmp_path}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"transformax-train: error: {key}")
