"""Command lines: ``transformax-train`` and ``transformax-generate`` (thin: parse, call, print).

Every failure is one line ``transformax-<cmd>: error: ...`` on stderr and a non-zero exit
status (``--debug`` adds the traceback); warnings are one line ``transformax-<cmd>: warning:``.
"""

from __future__ import annotations

import argparse
import errno
import functools
import gc
import logging
import math
import os
import re
import signal
import sys
import traceback
import warnings
from pathlib import Path

from transformax import compile_cache

# XLA:CPU allocates each step's temporaries as one block (~1 GiB for a small GPT) from a worker
# thread; glibc maps and unmaps it every step (~300k page faults, a fifth of the step in kernel
# time). One arena, no mmap and no trimming keep that block in the heap and reuse it: no faults.
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=17179869184")


def tune_malloc() -> None:
    """Re-execute this command once with ``GLIBC_TUNABLES`` = :data:`MALLOC_TUNABLES` (glibc
    reads it at start-up). Leaves the process as it is where GLIBC_TUNABLES is already set,
    ``TRANSFORMAX_NO_REEXEC=1``, or not on Linux."""
    if ("GLIBC_TUNABLES" in os.environ or os.environ.get("TRANSFORMAX_NO_REEXEC") == "1"
            or not sys.platform.startswith("linux")):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, TRANSFORMAX_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, sys.argv[0], *sys.argv[1:]], env)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``prog: error: ...`` (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low: float, name: str):
    """An argparse ``type``: a finite ``kind`` (int/float) >= ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value
    return parse


def exit_on_signals(prog: str) -> None:
    """For a command run from the shell: SIGINT or SIGTERM ends it at once with one line and
    ``128 + signal`` (a training loop takes the signals over while it runs, to save first).
    Nothing is lost before the loop; raising instead could stop a native module's import
    half-done, and jaxlib then crashes on exit."""
    def handle(signum, frame):
        os.write(2, f"{prog}: interrupted ({signal.Signals(signum).name})\n".encode())
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


def _guarded(prog: str, debug: bool, body) -> int:
    """``body()``'s exit status; an error becomes one line on stderr and status 1 (130 / 143
    after SIGINT / SIGTERM), warnings one line each."""
    from transformax.train.interrupt import Interrupted  # stdlib only: quick

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        hook, loggers = sys.unraisablehook, [logging.getLogger(n) for n in ("absl", "asyncio")]
        levels = [logger.level for logger in loggers]
        if not debug:  # orbax logs the errors it raises, with tracebacks: reported once below
            sys.unraisablehook = functools.partial(_quiet_failed_reads, hook)
            for logger in loggers:
                logger.setLevel(logging.CRITICAL)
        try:
            return body()
        except Interrupted as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print(f"{prog}: interrupted (SIGINT)", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - the one place every error is reported
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {_describe(e, debug)}", file=sys.stderr)
            if getattr(e, "exit_at_once", False):  # a lost peer: skip jax's exit-time shutdown
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            gc.collect()  # abandoned orbax writes log their errors when collected: now, quietly
            return 1
        finally:
            sys.unraisablehook = hook
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _quiet_failed_reads(hook, unraisable) -> None:
    """Drop what a checkpoint read that failed (already reported as a warning or error) leaves
    behind: orbax's abandoned reads and their callbacks into its closed event loop."""
    error = unraisable.exc_value
    if "TensorStore" in str(error) or str(error) == "Event loop is closed":
        return
    hook(unraisable)


DISK_ERRORS = {errno.ENOSPC: "no space left on device (disk full)",
               errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def _describe(error: Exception, debug: bool) -> str:
    """One line for ``error``: a file-system failure anywhere in its chain by its path and
    cause; our own errors by their message; anything else by type and first line."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        code, path = (e.errno, e.filename) if isinstance(e, OSError) else (None, None)
        for wrapped in (errno.ENOSPC, errno.EROFS):  # by orbax / tensorstore, in the message
            if code is None and os.strerror(wrapped) in str(e):
                quoted = re.search(r'"(/[^"]+)"', str(e))
                code, path = wrapped, quoted and quoted[1]
        if code in DISK_ERRORS:
            return f"cannot write{f' {path}' if path else ''}: {DISK_ERRORS[code]}"
    first = (str(error).strip().splitlines() or [""])[0]
    ours = type(error).__module__.startswith("transformax")
    if ours or isinstance(error, (ValueError, OSError)):
        return first or type(error).__name__
    return f"{type(error).__name__}: {first}" + ("" if debug else " (--debug shows where)")


def _cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not use the persistent compilation cache (on from the command "
                             f"line, in ${compile_cache.ENV} or {compile_cache.DEFAULT})")


def train_main(argv: list[str] | None = None) -> int:
    """``transformax-train --config FILE [--resume] [key.sub=value ...]``."""
    parser = _Parser(
        prog="transformax-train", description="Train a transformax model from a YAML config.")
    parser.add_argument("--config", help="YAML file merged onto the schema (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's latest checkpoint (automatic when "
                             "there is one; with this flag, a missing one is an error)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    _cache_flag(parser)
    parser.add_argument("--profile", metavar="START:STOP",
                        help="write a jax.profiler trace of those steps to the run's profile/ "
                             "(same as log.profile=START:STOP)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.overrides.append(f"log.profile='{args.profile}'")  # quoted: YAML reads 2:4 as 124
    command_line = argv is None and not args.print_config
    if command_line:
        tune_malloc()
        exit_on_signals(parser.prog)

    def body() -> int:
        if command_line:
            compile_cache.enable(not args.no_compile_cache)
        from transformax import train

        cfg = train.load(args.config, args.overrides)
        if args.print_config:
            print(train.config.to_yaml(cfg), end="")
            return 0
        result = train.train(cfg, resume=True if args.resume else None)
        last = next((r for r in reversed(result.records) if "eval_loss" in r), None)
        print(f"done: {result.run_dir} (step {int(result.state.step)}"
              + (f", eval loss {last['eval_loss']:.4f})" if last else ")"))
        return 0

    return _guarded(parser.prog, args.debug, body)


def _load_generator(path: Path):
    """``(module, params, cfg, tokenizer, eos_id)``; ``tokenizer`` (a
    :class:`transformax.tokenizer.Tokenizer`) is ``None`` for a folder without one."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder" if not path.exists() else
                                f"{path}: not a folder (expected a run or model folder)")
    if (path / "config.yaml").exists():
        from transformax import train

        run_cfg, state = train.load_run(path)
        if not run_cfg.task.decoder:
            raise ValueError(f"model.arch={run_cfg.model.arch!r} does not generate text")
        tokenizer = train.sources.saved_tokenizer(path, run_cfg.data)
        return run_cfg.task.module, state.params, run_cfg.model_config, tokenizer, None
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: neither a transformax-train run folder (no "
                                f"config.yaml) nor a Hugging Face model folder (no config.json)")
    from transformax import models
    from transformax import tokenizer as tokenizer_lib

    module, params, cfg = models.load_pretrained(path)
    if not hasattr(module, "apply_cached"):
        raise ValueError(f"{path}: a {module.__name__.rpartition('.')[2]} model does not "
                         f"generate text")
    try:
        tokenizer = tokenizer_lib.load(path)
    except FileNotFoundError:
        tokenizer = None
    return module, params, cfg, tokenizer, models.pretrained.eos_id(path, cfg.vocab_size)


def generate_main(argv: list[str] | None = None) -> int:
    """``transformax-generate PATH [--prompt TEXT | --ids ...]``: sample from a training run's
    folder (byte-level) or a Hugging Face model folder on disk (GPT-2 or Llama; its tokenizer
    when the folder has one, else ``--ids`` in and ids out). Nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _Parser(
        prog="transformax-generate",
        description="Generate text from a transformax-train run or a Hugging Face model folder.")
    parser.add_argument("path", type=Path, help="a transformax-train run folder or a Hugging Face "
                                                "model folder")
    parser.add_argument("--prompt", default="", help="prompt text")
    parser.add_argument("--ids", type=_number(int, 0, "a token id >= 0"), nargs="+",
                        help="prompt token ids (instead of text)")
    parser.add_argument("--max-new-tokens", type=_number(int, 1, "an integer >= 1"), default=64)
    parser.add_argument("--temperature", type=_number(float, 0, "a number >= 0"), default=0.8,
                        help="0 = greedy")
    parser.add_argument("--top-k", type=_number(int, 1, "an integer >= 1"), default=None)
    parser.add_argument("--top-p", type=float, default=None, help="in (0, 1]")
    parser.add_argument("--num", type=_number(int, 1, "an integer >= 1"), default=1,
                        help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", choices=("int8-weight", "int8-dynamic", "int8-static",
                                               "int4-weight"),
                        help="run the linear layers in int8 (transformax.quant recipe; "
                             "int8-static calibrates on 4 batches of the run's own training "
                             "data, or of the standard-library corpus for a model folder)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    _cache_flag(parser)
    args = parser.parse_args(argv)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"argument --top-p: expected a number in (0, 1], got {args.top_p}")
    if argv is None:
        exit_on_signals(parser.prog)
        compile_cache.enable(not args.no_compile_cache)
    return _guarded(parser.prog, args.debug, lambda: _generate(args))


def _generate(args) -> int:
    """``transformax-generate``'s work, once its arguments parsed."""
    import jax
    import numpy as np

    from transformax import generate

    module, params, cfg, tokenizer, eos = _load_generator(args.path)
    if args.ids is not None:
        ids = args.ids
    elif tokenizer is not None:
        ids = tokenizer.encode(args.prompt)
    else:
        raise ValueError(f"{args.path} has no tokenizer: pass the prompt as --ids")
    if not ids:
        raise ValueError("empty prompt: pass --prompt TEXT or --ids")
    outside = [i for i in ids if i >= cfg.vocab_size]
    if outside:
        raise ValueError(f"--ids: token id {outside[0]} is outside the model's vocabulary "
                         f"(ids 0 to {cfg.vocab_size - 1})")
    prompts = np.tile(np.asarray(ids, np.int32), (args.num, 1))
    if args.quantize:
        from transformax import quant

        calibration = (quant.folder_calibration(args.path, module, cfg, tokenizer)
                       if args.quantize == "int8-static" else None)
        params = quant.quantize(params, args.quantize, calibration=calibration)
    out = generate.generate(module, params, cfg, prompts, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            rng=jax.random.key(args.seed), eos_id=eos, pad_id=-1)
    for row in np.asarray(out):
        new = [int(i) for i in row if i >= 0]
        if args.ids is not None or tokenizer is None:
            print(" ".join(map(str, new)))
        else:
            print(tokenizer.decode(ids + new))
    return 0
