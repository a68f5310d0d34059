"""Command lines: ``transformax-train`` and ``transformax-generate`` (thin: parse, call, print)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# glibc's malloc backs its memory with transparent huge pages: XLA:CPU's per-step buffers then
# cost ~1k page faults per train step instead of ~300k (a fifth of the step in kernel time).
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def tune_malloc() -> None:
    """Re-execute this command once with ``GLIBC_TUNABLES`` = :data:`MALLOC_TUNABLES` (glibc
    reads it at start-up). Leaves the process as it is where GLIBC_TUNABLES is already set,
    ``TRANSFORMAX_NO_REEXEC=1``, or not on Linux."""
    if ("GLIBC_TUNABLES" in os.environ or os.environ.get("TRANSFORMAX_NO_REEXEC") == "1"
            or not sys.platform.startswith("linux")):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, TRANSFORMAX_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, sys.argv[0], *sys.argv[1:]], env)


def train_main(argv: list[str] | None = None) -> int:
    """``transformax-train --config FILE [--resume] [key.sub=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="transformax-train", description="Train a transformax model from a YAML config.")
    parser.add_argument("--config", help="YAML file merged onto the schema (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's latest checkpoint (automatic when "
                             "there is one; with this flag, a missing one is an error)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if argv is None and not args.print_config:
        tune_malloc()

    from transformax import train

    try:
        cfg = train.load(args.config, args.overrides)
        if args.print_config:
            print(train.config.to_yaml(cfg), end="")
            return 0
        result = train.train(cfg, resume=True if args.resume else None)
    except (train.ConfigError, train.TrainingDiverged, FileNotFoundError, FileExistsError) as e:
        print(f"transformax-train: error: {e}", file=sys.stderr)
        return 1
    last = next((r for r in reversed(result.records) if "eval_loss" in r), None)
    print(f"done: {result.run_dir} (step {int(result.state.step)}"
          + (f", eval loss {last['eval_loss']:.4f})" if last else ")"))
    return 0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_generator(path: Path):
    """``(module, params, cfg, tokenizer, eos_id)``; ``tokenizer`` is ``None`` for a Hugging Face
    folder without one and ``"bytes"`` for a byte-level training run."""
    if (path / "config.yaml").exists():
        from transformax import train

        run_cfg, state = train.load_run(path)
        if not run_cfg.task.decoder:
            raise ValueError(f"model.arch={run_cfg.model.arch!r} does not generate text")
        return run_cfg.task.module, state.params, run_cfg.model_config, "bytes", None
    import transformers

    from transformax import models

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    module, params, cfg = models.from_hf(hf_model)
    has_tokenizer = any((path / f).exists() for f in TOKENIZER_FILES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    eos = hf_model.generation_config.eos_token_id
    return module, params, cfg, tokenizer, eos[0] if isinstance(eos, list) else eos


def generate_main(argv: list[str] | None = None) -> int:
    """``transformax-generate PATH [--prompt TEXT | --ids ...]``: sample from a training run's
    folder (byte-level) or a Hugging Face model folder on disk (GPT-2 or Llama; its tokenizer
    when the folder has one, else ``--ids`` in and ids out). Nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(
        prog="transformax-generate",
        description="Generate text from a transformax-train run or a Hugging Face model folder.")
    parser.add_argument("path", type=Path, help="a transformax-train run folder or a Hugging Face "
                                                "model folder")
    parser.add_argument("--prompt", default="", help="prompt text")
    parser.add_argument("--ids", type=int, nargs="+", help="prompt token ids (instead of text)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num", type=int, default=1, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from transformax import generate

    try:
        module, params, cfg, tokenizer, eos = _load_generator(args.path)
        if args.ids is not None:
            ids = args.ids
        elif tokenizer == "bytes":
            ids = list(args.prompt.encode())
        elif tokenizer is not None:
            ids = tokenizer(args.prompt)["input_ids"]
        else:
            raise ValueError(f"{args.path} has no tokenizer: pass the prompt as --ids")
        if not ids:
            raise ValueError("empty prompt: pass --prompt TEXT or --ids")
        prompts = np.tile(np.asarray(ids, np.int32), (args.num, 1))
        out = generate.generate(module, params, cfg, prompts, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                rng=jax.random.key(args.seed), eos_id=eos, pad_id=-1)
    except (ValueError, OSError) as e:
        print(f"transformax-generate: error: {e}", file=sys.stderr)
        return 1
    for row in np.asarray(out):
        new = [int(i) for i in row if i >= 0]
        if args.ids is not None or tokenizer is None:
            print(" ".join(map(str, new)))
        elif tokenizer == "bytes":
            print(args.prompt + bytes(new).decode("utf-8", errors="replace"))
        else:
            print(tokenizer.decode(ids + new, skip_special_tokens=True))
    return 0
