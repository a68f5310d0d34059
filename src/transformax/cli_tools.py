"""Command lines around training: ``transformax-prepare`` (text -> ``.bin`` token files) and
``transformax-export`` (a run -> a Hugging Face model folder)."""

from __future__ import annotations

from pathlib import Path

from transformax.cli import _guarded, _Parser, exit_on_signals


def prepare_main(argv: list[str] | None = None) -> int:
    """``transformax-prepare INPUT... --out DIR [--tokenizer bytes|bpe|hf:PATH]``."""
    parser = _Parser(prog="transformax-prepare",
                     description="Tokenize text files or folders into nanoGPT-style train.bin / "
                                 "val.bin (and tokenizer.json) for data.source=bin.")
    parser.add_argument("inputs", nargs="+", help="text files, folders (every file under them) "
                                                  "or globs")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--tokenizer", default="bpe", help="bytes, bpe (learned from the "
                        "training split) or hf:PATH (a tokenizer.json or a model folder)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="bpe: vocabulary size")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of the text (its tail) held out as val.bin")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"argument --val-fraction: expected a number in (0, 1), got "
                     f"{args.val_fraction}")
    if argv is None:
        exit_on_signals(parser.prog)
    return _guarded(parser.prog, args.debug, lambda: _prepare(args))


def _prepare(args) -> int:
    import numpy as np

    from transformax.train import data, sources

    files = sorted({f for pattern in args.inputs for f in data.text_files(pattern)})
    text = b"\n\n".join(f.read_bytes() for f in files)
    n_val = max(1, int(len(text) * args.val_fraction))
    train, val = text[:-n_val], text[-n_val:]
    args.out.mkdir(parents=True, exist_ok=True)
    tok = sources.run_tokenizer(args.tokenizer, args.vocab_size, args.out, lambda: train)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    for name, split in (("train.bin", train), ("val.bin", val)):
        tok.encode_corpus(split, dtype).tofile(args.out / name)
    keys = (f"data.source=bin data.path={args.out} data.dtype={np.dtype(dtype).name} "
            f"data.vocab_size={tok.vocab_size} data.tokenizer=hf:{tok.save(args.out)}")
    sizes = {n: (args.out / n).stat().st_size // np.dtype(dtype).itemsize
             for n in ("train.bin", "val.bin")}
    print(f"{len(files)} files, {len(text):,} bytes -> {sizes['train.bin']:,} + "
          f"{sizes['val.bin']:,} tokens ({tok.name}) in {args.out}\ntrain with: {keys}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``transformax-export RUN OUT [--step N]``."""
    parser = _Parser(prog="transformax-export",
                     description="Write a transformax-train run's weights as a Hugging Face model "
                                 "folder (config.json, model.safetensors, tokenizer.json).")
    parser.add_argument("run", type=Path, help="a transformax-train run folder")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the "
                                                               "latest)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if argv is None:
        exit_on_signals(parser.prog)
    return _guarded(parser.prog, args.debug, lambda: _export(args))


def _export(args) -> int:
    from transformax import models
    from transformax.train import load_run, sources

    if not (args.run / "config.yaml").is_file():
        raise FileNotFoundError(f"{args.run}: no config.yaml there (not a transformax-train run "
                                f"folder)")
    cfg, state = load_run(args.run, args.step)
    models.save_pretrained(cfg.task.module, state.params, cfg.model_config, args.out)
    tok = sources.saved_tokenizer(args.run, cfg.data)
    if tok is not None:
        tok.save(args.out)
    print(f"{args.out}: {cfg.model.arch} step {int(state.step)}"
          + (f", tokenizer.json ({tok.name})" if tok else " (token ids: no tokenizer)"))
    return 0
