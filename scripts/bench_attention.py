"""Attention benchmark on CPU: tfx.sdpa (auto and each CPU kernel) against torch's SDPA and
jax.nn.dot_product_attention, same inputs, same process, medians after warm-up.

    python scripts/bench_attention.py                      # the full sweep (L = 512 .. 8192)
    python scripts/bench_attention.py --lengths 512 1024 --repeats 3
    python scripts/bench_attention.py --gpu ...            # the GPU sweep (bench_attention_gpu.py)

Prints a table with each implementation's time and its ratio to torch, writes JSON and a PNG
(time against L, one line per implementation) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_callable(attend, q, k, v, backward: bool):
    if backward:
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
    else:
        f = jax.jit(attend)
    start = time.perf_counter()
    jax.block_until_ready(f(q, k, v))
    compile_s = time.perf_counter() - start
    return (lambda: jax.block_until_ready(f(q, k, v))), compile_s


def torch_callable(torch, q, k, v, causal: bool, backward: bool):
    tq, tk, tv = (torch.tensor(np.asarray(x), requires_grad=backward) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        if backward:
            sdpa(tq, tk, tv, is_causal=causal).sum().backward()
        else:
            with torch.no_grad():
                sdpa(tq, tk, tv, is_causal=causal)
    return run


def implementations(causal: bool):
    import transformax as tfx

    def tfx_with(backend):
        def attend(q, k, v):
            if backend is None:
                return tfx.sdpa(q, k, v, is_causal=causal)
            with tfx.sdpa_kernel(backend):
                return tfx.sdpa(q, k, v, is_causal=causal)
        return attend

    return {
        "tfx auto": tfx_with(None),
        "tfx xla_flash": tfx_with(tfx.Backend.XLA_FLASH),
        "tfx math": tfx_with(tfx.Backend.MATH),
        "jax.nn": lambda q, k, v: jnp.swapaxes(jax.nn.dot_product_attention(
            *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), is_causal=causal), 1, 2),
    }


def attention_flops(batch, heads, length, dim, causal, backward) -> float:
    flops = 4.0 * batch * heads * length * length * dim
    flops = flops / 2 if causal else flops
    return flops * 3.5 if backward else flops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="run scripts/bench_attention_gpu.py with the other arguments")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[],
                        help="implementations to leave out, e.g. 'tfx math' 'jax.nn'")
    parser.add_argument("--max-materialised-gib", type=float, default=4.0,
                        help="skip kernels that materialise scores larger than this")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--out", default="bench_out")
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu" in argv:  # the GPU sweep has its own options: pass them all through
        script = str(pathlib.Path(__file__).with_name("bench_attention_gpu.py"))
        sys.argv = [script, *(a for a in argv if a != "--gpu")]
        runpy.run_path(script, run_name="__main__")
        return
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(os.cpu_count())
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    header = f"{'L':>6} {'causal':>6} {'pass':>8} {'implementation':<15} {'ms':>9} {'GF/s':>7} {'x torch':>8}"
    print(f"CPU: {os.cpu_count()} threads, jax {jax.__version__}, torch {torch.__version__}, "
          f"f32, B={args.batch}, H={args.heads}, E={args.dim}\n{header}")
    for length in args.lengths:
        shape = (args.batch, args.heads, length, args.dim)
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
        scores_gib = args.batch * args.heads * length * length * 4 / 2**30
        for causal in (True, False):
            for backward in (False,) if args.no_backward else (False, True):
                flops = attention_flops(args.batch, args.heads, length, args.dim, causal,
                                        backward)
                torch_s = median_seconds(torch_callable(torch, q, k, v, causal, backward),
                                         args.repeats)
                results = {"torch sdpa": (torch_s, 0.0)}
                for name, attend in implementations(causal).items():
                    materialises = name in ("tfx math", "jax.nn")
                    if name in args.skip or (materialises
                                             and scores_gib * 3 > args.max_materialised_gib):
                        continue
                    run, compile_s = jax_callable(attend, q, k, v, backward)
                    results[name] = (median_seconds(run, args.repeats), compile_s)
                for name, (seconds, compile_s) in results.items():
                    row = {"L": length, "causal": causal, "pass": "fwd+bwd" if backward else "fwd",
                           "impl": name, "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
                           "ratio_to_torch": seconds / torch_s, "compile_s": compile_s}
                    rows.append(row)
                    print(f"{length:>6} {str(causal):>6} {row['pass']:>8} {name:<15} "
                          f"{row['ms']:>9.1f} {row['gflops']:>7.1f} {row['ratio_to_torch']:>8.2f}",
                          flush=True)
    (out_dir / "bench_attention.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out_dir / "bench_attention.png")
    print(f"wrote {out_dir / 'bench_attention.json'} and {out_dir / 'bench_attention.png'}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["causal"], r["pass"]) for r in rows}, key=lambda p: (p[1], not p[0]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (causal, pass_) in zip(axes[0], panels):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["L"], r["ms"]) for r in rows
                   if r["impl"] == impl and r["causal"] == causal and r["pass"] == pass_]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="L = S", ylabel="ms (median)",
               title=f"{pass_}, {'causal' if causal else 'full'}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
