"""Held-out loss of a training run with and without int8 quantization.

    python scripts/eval_quant.py RUN [--recipes int8-weight int8-dynamic] [--batches 16]
                                     [--step STEP] [--out FILE.json]

Loads the run's checkpoint (default the latest), evaluates the same held-out batches the
training loop evaluates (``eval`` stream, same seed) with the f32 parameters and with each
recipe's quantized parameters (``transformax.quant``), and prints each loss and its relative
change. ``int8-static`` calibrates on ``--batches`` training batches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax

from transformax import quant
from transformax.train import data as data_lib
from transformax.train import loop, sources
from transformax.train.step import make_eval_step


def held_out_loss(eval_step, params, batches, n: int) -> float:
    total = count = 0.0
    for i in range(n):
        s, c = eval_step(params, batches(i, data_lib.EVAL))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def evaluate(run: Path, recipes: list[str], n: int, step: int | None) -> dict:
    cfg, state = loop.load_run(run, step)
    _, corpus = sources.tokenize(cfg.data, data_lib.load_corpus(cfg.data), run)
    t = cfg.train
    batches = data_lib.Batches(
        corpus, cfg.seed, (t.grad_accum, t.batch_size // t.grad_accum), cfg.data.seq_len,
        cfg.data.mlm_probability if cfg.task.objective == "mlm" else None)

    def loss_fn(params, batch, rng):
        return cfg.task.loss(params, batch, cfg.model_config, rng)

    eval_step = jax.jit(make_eval_step(loss_fn))
    calibration = (eval_step, [batches(i) for i in range(n)])  # training batches
    rows = [{"recipe": "f32", "loss": held_out_loss(eval_step, state.params, batches, n)}]
    for recipe in recipes:
        qparams = quant.quantize(state.params, recipe, calibration=(
            calibration if recipe == "int8-static" else None))
        rows.append({"recipe": recipe, "loss": held_out_loss(eval_step, qparams, batches, n)})
    for r in rows:
        r["relative_change"] = r["loss"] / rows[0]["loss"] - 1
    return {"run": str(run), "step": int(state.step), "eval_batches": n, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eval_quant.py", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a transformax-train run folder")
    parser.add_argument("--recipes", nargs="+", choices=list(quant.RECIPES),
                        default=["int8-weight", "int8-dynamic"])
    parser.add_argument("--batches", type=int, default=16, help="held-out batches")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--out", type=Path, default=None, help="also write JSON here")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"argument --batches: expected an integer >= 1, got {args.batches}")
    if not (args.run / "config.yaml").is_file():
        parser.error(f"{args.run}: not a transformax-train run folder (no config.yaml)")
    try:
        result = evaluate(args.run, args.recipes, args.batches, args.step)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"{result['run']} step {result['step']}: held-out loss over {args.batches} batches")
    print(f"{'params':<14} {'loss':>8} {'bits/token':>11} {'vs f32':>8}")
    for r in result["rows"]:
        print(f"{r['recipe']:<14} {r['loss']:>8.4f} {r['loss'] / math.log(2):>11.4f} "
              f"{r['relative_change']:>+8.3%}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
