"""Int8 inference benchmark on CPU: transformax f32 / int8-weight / int8-dynamic (each eligible
kernel) against torch f32, torch ``quantize_dynamic`` (x86, fbgemm and onednn engines) and
torch's int8 weight-only linear (``_weight_int8pack_mm``) on the PERF.md MLP stack, same weights
and inputs, one process, interleaved rounds, medians.

    python scripts/bench_quant.py [--bench mlp linear decode rows] [--blocks 6] [--tokens 4096]
                                  [--rows 1 8 64 256] [--rounds 3] [--repeats 2]
                                  [--out bench_quant.json]
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python scripts/bench_quant.py

The stack: ``--blocks`` x [Linear(1024 -> 4096) -> GELU(tanh) -> Linear(4096 -> 1024)] on
``--tokens`` tokens. Errors are relative Frobenius norms against a float64 torch forward.
``--bench linear``: one Linear(1024 -> 4096) at ``--rows`` rows, f32 against int8 weight-only
(each transformax kernel; torch's with f32 and bf16 activations). ``--bench decode``: GPT-2-small
greedy decoding (batch 1) tokens/s, f32 against int8 and int4. ``--bench rows``: the native
kernels against every other cpu kernel by rows (their crossovers). Prints tables and writes JSON
with the host (CPU, ISA, caches, versions, flags).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

from transformax import generate, host, nn, quant
from transformax.models import gpt

D, HIDDEN = 1024, 4096
ENGINES = ("x86", "fbgemm", "onednn")


def mlp_weights(blocks: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def layer(d_in, d_out):
        return {"w": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32),
                "b": (rng.standard_normal(d_out) * 0.1).astype(np.float32)}

    return [{"fc": layer(D, HIDDEN), "proj": layer(HIDDEN, D)} for _ in range(blocks)]


def torch_stack(weights, dtype=torch.float32) -> torch.nn.Sequential:
    modules = []
    for block in weights:
        for name in ("fc", "proj"):
            w = block[name]["w"]
            linear = torch.nn.Linear(*w.shape, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(w.T.copy()))
                linear.bias.copy_(torch.from_numpy(block[name]["b"]))
            modules.append(linear)
            if name == "fc":
                modules.append(torch.nn.GELU(approximate="tanh"))
    return torch.nn.Sequential(*modules).eval()


def int8_per_channel(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's weight-only layout of a float ``(in, out)`` weight: int8 ``(out, in)`` and the
    per-output-channel scale (symmetric, as ``quant.quantize`` rounds)."""
    amax = np.abs(w).max(0)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return torch.from_numpy(q.T.copy()), torch.from_numpy(scale)


def torch_weight_only(weights, dtype):
    """The MLP stack on torch's int8 weight-only matmul, activations in ``dtype``."""
    layers = [(*int8_per_channel(block[name]["w"]), torch.from_numpy(block[name]["b"]), name)
              for block in weights for name in ("fc", "proj")]

    def run(x):
        x = x.to(dtype)
        for q, scale, b, name in layers:
            x = torch.ops.aten._weight_int8pack_mm(x, q, scale.to(dtype)) + b.to(dtype)
            if name == "fc":
                x = torch.nn.functional.gelu(x, approximate="tanh")
        return x.float()
    return run


def tfx_stack(params, x):
    for block in params:
        x = nn.gelu_mlp(block, x)
    return x


def timed_rounds(candidates: dict, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, the candidates interleaved round by round."""
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def rel_error(y, ref: np.ndarray) -> float:
    if isinstance(y, torch.Tensor):
        y = y.double()
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def mlp_bench(args) -> list[dict]:
    weights = mlp_weights(args.blocks)
    x = np.random.default_rng(1).standard_normal((args.tokens, D)).astype(np.float32)
    tx = torch.from_numpy(x)
    with torch.no_grad():
        ref = torch_stack(weights, torch.float64)(tx.double()).numpy()
    runs, outputs, compile_s = {}, {}, {}

    model = torch_stack(weights)
    runs["torch f32"] = lambda: model(tx)
    for engine in ENGINES:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model),
                                                            {torch.nn.Linear}, dtype=torch.qint8)

        def run(qmodel=qmodel, engine=engine):
            torch.backends.quantized.engine = engine
            return qmodel(tx)
        runs[f"torch quantize_dynamic {engine}"] = run
    runs["torch int8 weight-only bf16 x"] = functools.partial(
        torch_weight_only(weights, torch.bfloat16), tx)  # f32 x: minutes at 4096 rows

    params = jax.tree.map(jnp.asarray, weights)
    xj = jnp.asarray(x)
    variants = {"transformax f32": (params, None)}
    for recipe in ("int8-weight", "int8-dynamic"):
        qparams = quant.quantize(params, recipe)
        e = quant.explain(xj, qparams[0]["fc"]["w"])
        for v in e.rows:
            if v.platform == "cpu" and not v.reasons:
                mark = "*" if v.chosen else ""
                variants[f"transformax {recipe} [{v.kernel.value}]{mark}"] = (qparams, v.kernel)

    for name, (p, k) in variants.items():
        with quant.kernel([k] if k else list(quant.Kernel)):
            fn = jax.jit(lambda p, x: tfx_stack(p, x))  # a fresh trace per kernel choice
            start = time.perf_counter()
            compiled = fn.lower(p, xj).compile()
            compile_s[name] = time.perf_counter() - start
        runs[name] = lambda c=compiled, p=p: jax.block_until_ready(c(p, xj))

    with torch.no_grad():
        for name, run in runs.items():
            outputs[name] = np.asarray(run())  # warm-up, and the output for the error
        times = timed_rounds(runs, args.rounds, args.repeats)
    base_t, base_j = (statistics.median(times[n]) for n in ("torch f32", "transformax f32"))
    rows = []
    for name in runs:
        t = statistics.median(times[name])
        rows.append({"name": name, "median_s": t, "times_s": times[name],
                     "speedup_vs_torch_f32": base_t / t, "speedup_vs_transformax_f32": base_j / t,
                     "rel_error": rel_error(outputs[name], ref),
                     "compile_s": compile_s.get(name)})
    torch_int8 = min(r["median_s"] for r in rows if "quantize_dynamic" in r["name"])
    for r in rows:
        r["time_vs_best_torch_int8"] = r["median_s"] / torch_int8
    flops = 2 * args.tokens * D * HIDDEN * 2 * args.blocks
    print(f"\nMLP stack: {args.blocks} x [Linear({D}->{HIDDEN}) -> GELU(tanh) -> "
          f"Linear({HIDDEN}->{D})], {args.tokens} tokens ({flops / 1e9:.0f} GOP); "
          f"medians of {args.rounds}x{args.repeats}; * = the kernel quant picks here")
    print(f"{'implementation':<42} {'median ms':>10} {'GOP/s':>7} {'vs torch f32':>13} "
          f"{'vs tfx f32':>11} {'vs torch int8':>14} {'rel. error':>11}")
    for r in rows:
        print(f"{r['name']:<42} {r['median_s'] * 1e3:>10.1f} {flops / r['median_s'] / 1e9:>7.0f} "
              f"{r['speedup_vs_torch_f32']:>12.2f}x {r['speedup_vs_transformax_f32']:>10.2f}x "
              f"{r['time_vs_best_torch_int8']:>13.2f}t {r['rel_error']:>11.2e}")
    print("(vs ...: speed-up, higher is faster; vs torch int8: time / the fastest torch engine's "
          "time, lower is faster)")
    return rows


def linear_bench(args) -> list[dict]:
    """One Linear(1024 -> 4096) without bias at each of ``--rows``: f32 and int8 weight-only."""
    w = mlp_weights(1)[0]["fc"]["w"]
    q, scale = int8_per_channel(w)
    qparams = quant.quantize({"w": jnp.asarray(w)}, "int8-weight")
    tw, wj = torch.from_numpy(w), jnp.asarray(w)
    rows = []
    print(f"\nLinear({D}->{HIDDEN}), no bias: time per call, medians of "
          f"{args.rounds}x{args.repeats * 10}; * = the kernel quant picks here")
    for m in args.rows:
        x = np.random.default_rng(3).standard_normal((m, D)).astype(np.float32)
        tx, xj = torch.from_numpy(x), jnp.asarray(x)
        ref = x.astype(np.float64) @ w.astype(np.float64)
        f32 = jax.jit(lambda x, w: x @ w).lower(xj, wj).compile()
        runs = {"transformax f32": lambda c=f32: jax.block_until_ready(c(xj, wj))}
        for v in quant.explain(xj, qparams["w"]).rows:
            if v.platform == "cpu" and not v.reasons:
                with quant.kernel([v.kernel]):
                    c = jax.jit(nn.linear).lower(qparams, xj).compile()
                name = f"transformax int8-weight [{v.kernel.value}]{'*' if v.chosen else ''}"
                runs[name] = lambda c=c: jax.block_until_ready(c(qparams, xj))
        runs["torch f32"] = lambda: tx @ tw
        for dtype in (torch.float32, torch.bfloat16):
            runs[f"torch int8 weight-only {str(dtype)[6:]} x"] = functools.partial(
                torch.ops.aten._weight_int8pack_mm, tx.to(dtype), q, scale.to(dtype))
        with torch.no_grad():
            errors = {n: rel_error(r(), ref) for n, r in runs.items()}
            times = timed_rounds(runs, args.rounds, args.repeats * 10)
        base = statistics.median(times["transformax f32"])
        torch_best = min(statistics.median(times[n]) for n in times if "torch int8" in n)
        print(f"rows {m}:")
        for n in runs:
            t = statistics.median(times[n])
            rows.append({"rows": m, "name": n, "median_s": t, "speedup_vs_transformax_f32":
                         base / t, "time_vs_best_torch_int8": t / torch_best,
                         "rel_error": errors[n]})
            print(f"  {n:<42} {t * 1e3:>9.3f} ms {base / t:>6.2f}x tfx f32 "
                  f"{t / torch_best:>6.2f}t torch int8 {errors[n]:>9.2e}")
    return rows


def rows_bench(args) -> list[dict]:
    """Where the native kernels (cpu_int8, cpu_int4) stop winning (``cpu_int8.ROW_LIMITS``): per
    recipe and ``--rows`` (at most ``cpu_int8.MAX_ROWS``), each eligible cpu kernel on one
    Linear(1024 -> 4096) and GPT-2-small's Linear(768 -> 3072)."""
    rng = np.random.default_rng(4)
    rows, native = [], {quant.Kernel.CPU_INT8, quant.Kernel.CPU_INT4}
    print(f"\nNative vs XLA kernels by rows: ms per call, medians of {args.rounds}x"
          f"{args.repeats * 10}; best = the fastest non-native kernel")
    for k, n in ((D, HIDDEN), (768, 3072)):
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
        for recipe in ("int8-weight", "int8-dynamic", "int4-weight"):
            qparams = quant.quantize({"w": w}, recipe)
            for m in args.rows:
                xj = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
                runs = {}
                for v in quant.explain(xj, qparams["w"]).rows:
                    if v.platform == "cpu" and not v.reasons:
                        with quant.kernel([v.kernel]):
                            c = jax.jit(nn.linear).lower(qparams, xj).compile()
                        runs[v.kernel] = lambda c=c: jax.block_until_ready(c(qparams, xj))
                if not native & set(runs):
                    continue  # more rows than the native kernels take
                times = {kk: statistics.median(t) for kk, t in
                         timed_rounds(runs, args.rounds, args.repeats * 10).items()}
                ours = min((kk for kk in times if kk in native), key=times.get)
                best = min((kk for kk in times if kk not in native), key=times.get)
                rows.append({"k": k, "n": n, "recipe": recipe, "rows": m,
                             "ms": {kk.value: t * 1e3 for kk, t in times.items()},
                             "native_over_best": times[ours] / times[best]})
                print(f"  ({m:>3}, {k}) @ ({k}, {n}) {recipe:<13} {ours.value} "
                      f"{times[ours] * 1e3:7.3f}  best {best.value:<10} {times[best] * 1e3:7.3f}"
                      f"  ratio {times[ours] / times[best]:5.2f}")
    return rows


def one_row_kernels(params) -> str:
    """The cpu kernel a one-row (decoding) product runs for the first quantized layer and for
    the quantized tied head, if any."""
    chosen = []
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
            x, (quant.QuantizedWeight, quant.QuantizedTable))):
        if isinstance(leaf, (quant.QuantizedWeight, quant.QuantizedTable)):
            w = leaf.T if isinstance(leaf, quant.QuantizedTable) else leaf
            name = quant.explain(jnp.zeros((1, w.shape[0])), w).chosen("cpu").value
            head = isinstance(leaf, quant.QuantizedTable)
            if (head or not chosen) and f"{'head ' * head}{name}" not in chosen:
                chosen.append(f"{'head ' * head}{name}")
    return ", ".join(chosen) or "-"


def decode_bench(args) -> list[dict]:
    """GPT-2-small shape (random weights), batch 1, greedy: tokens/s, parameter bytes and the
    kernel a one-row product runs."""
    cfg = gpt.Config()
    params = jax.jit(gpt.init, static_argnums=1)(jax.random.key(0), cfg)
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 8)), jnp.int32)
    variants = {"f32": params, **{r: quant.quantize(params, r)
                                  for r in ("int8-weight", "int4-weight", "int8-dynamic")},
                "int8-weight + int8 wte (tied head)": quant.quantize(
                    params, quant.Recipe(embeddings=("wte",))),
                "int8-dynamic + int8 wte (tied head)": quant.quantize(
                    params, quant.Recipe(activations="dynamic", embeddings=("wte",)))}
    runs, tokens, compile_s = {}, {}, {}
    for name, p in variants.items():
        def run(p=p):
            return jax.block_until_ready(generate.generate(
                gpt, p, cfg, prompt, max_new_tokens=args.new_tokens, temperature=0))
        start = time.perf_counter()
        tokens[name] = np.asarray(run())
        compile_s[name] = time.perf_counter() - start
        runs[name] = run
    times = timed_rounds(runs, args.rounds, args.repeats)
    rows = []
    base = statistics.median(times["f32"])
    for name, p in variants.items():
        t = statistics.median(times[name])
        nbytes = sum(x.nbytes for x in jax.tree.leaves(p))
        rows.append({"name": name, "median_s": t, "tokens_per_s": args.new_tokens / t,
                     "speedup_vs_f32": base / t, "param_bytes": nbytes,
                     "kernel_one_row": one_row_kernels(p),
                     "same_tokens_as_f32": bool((tokens[name] == tokens["f32"]).all()),
                     "first_call_s": compile_s[name]})
    print(f"\nDecode: GPT-2 small (random weights), batch 1, prompt 8, {args.new_tokens} new "
          f"tokens, greedy (prefill included)")
    print(f"{'params':<36} {'tokens/s':>9} {'vs f32':>7} {'param MiB':>10} {'same tokens':>12}  "
          f"kernel (1 row)")
    for r in rows:
        print(f"{r['name']:<36} {r['tokens_per_s']:>9.1f} {r['speedup_vs_f32']:>6.2f}x "
              f"{r['param_bytes'] / 2**20:>10.0f} {str(r['same_tokens_as_f32']):>12}  "
              f"{r['kernel_one_row']}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32 * 128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bench", nargs="+", choices=("mlp", "linear", "decode", "rows"),
                        default=["mlp"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench_quant.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    machine = host.current()
    print(f"host: {machine.describe()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!r} "
          f"torch capability {torch.backends.cpu.get_cpu_capability()}")
    result = {"host": machine.as_json(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "args": vars(args)}
    for name in args.bench:
        result[name] = {"mlp": mlp_bench, "linear": linear_bench,
                        "decode": decode_bench, "rows": rows_bench}[name](args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
