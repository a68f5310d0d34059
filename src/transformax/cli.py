"""Command lines: ``transformax-train`` and ``transformax-generate`` (thin: parse, call, print)."""

from __future__ import annotations

import argparse
import os
import sys

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


def generate_main(argv: list[str] | None = None) -> int:
    """``transformax-generate RUN_DIR [--prompt TEXT] ...``: sample from a trained run."""
    parser = argparse.ArgumentParser(
        prog="transformax-generate", description="Sample text from a trained run's checkpoint.")
    parser.add_argument("run_dir", help="a run folder written by transformax-train")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--num", type=int, default=1, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from transformax import train
    from transformax.train.samples import sample_text

    try:
        cfg, state = train.load_run(args.run_dir, args.step)
    except (train.ConfigError, FileNotFoundError) as e:
        print(f"transformax-generate: error: {e}", file=sys.stderr)
        return 1
    if not cfg.task.decoder:
        print(f"transformax-generate: error: model.arch={cfg.model.arch!r} does not generate "
              f"text", file=sys.stderr)
        return 1
    for text in sample_text(cfg.task, state.params, cfg.model_config, args.prompt,
                            num=args.num, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k,
                            rng=jax.random.key(args.seed)):
        print(text)
    return 0
