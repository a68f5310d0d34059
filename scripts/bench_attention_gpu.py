"""Attention benchmark on an NVIDIA GPU: transformax's Pallas Triton kernel against cuDNN and XLA
(both through jax.nn.dot_product_attention), same inputs, same process, medians after warm-up.

bf16, B*S = 16384 tokens, 16 heads, head dims 128 and 64, S in {16384, 8192, 2048, 512}, full
and causal, forward and forward+backward (the shapes of the published H100 figures in PERF.md).
Each implementation gets its native layout: tfx (B, H, S, D), jax.nn (B, S, H, D).

    python scripts/bench_attention_gpu.py                    # the sweep, within --budget seconds
    python scripts/bench_attention_gpu.py --dims 128 --lengths 16384 --passes fwd
    python scripts/bench_attention_gpu.py --tune             # Pallas Triton tile sweep, 16k hd128

Prints TFLOP/s per implementation and Pallas Triton's time over cuDNN's, checks the targets
(Pallas Triton forward, hd128, full: >= 350 TFLOP/s and within 1.6x of cuDNN's time), writes
JSON and a PNG to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_attention import attention_flops  # noqa: E402

TOKENS, HEADS = 16384, 16
TARGET_TFLOPS, TARGET_RATIO = 350.0, 1.6


def gpu_seconds(fn, args, repeats: int, calls: int = 10) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back launches (the launches
    queue up asynchronously, so dispatch overhead does not count)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def implementations(causal: bool):
    """name -> (attend(q, k, v), layout); layout "bhsd" or "bshd"."""
    import transformax as tfx

    def tfx_with(backend):
        def attend(q, k, v):
            with tfx.sdpa_kernel(backend):
                return tfx.sdpa(q, k, v, is_causal=causal)
        return attend

    def jax_nn(implementation):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation)

    return {"pallas_triton": (tfx_with(tfx.Backend.PALLAS_TRITON), "bhsd"),
            "tfx cudnn": (tfx_with(tfx.Backend.CUDNN), "bhsd"),
            "cudnn": (jax_nn("cudnn"), "bshd"),
            "xla": (jax_nn("xla"), "bshd")}


def compiled(attend, backward: bool, args):
    """The jitted pass and its compile (first call) time."""
    if backward:
        def run(q, k, v, dout):
            _, vjp = jax.vjp(attend, q, k, v)
            return vjp(dout)
    else:
        def run(q, k, v, dout):
            return attend(q, k, v)
    fn = jax.jit(run)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return fn, time.perf_counter() - start


def sweep(args, out_dir: pathlib.Path):
    rows, started = [], time.perf_counter()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, B*S={TOKENS}, "
          f"H={HEADS}")
    print(f"{'D':>4} {'S':>6} {'B':>3} {'causal':>6} {'pass':>8} "
          + " ".join(f"{n:>14}" for n in args.impls) + f" {'time vs cudnn':>13} {'max|diff|':>9}")
    for dim, length, causal, pass_ in itertools.product(args.dims, args.lengths, (False, True),
                                                        args.passes):
        if time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping here")
            break
        batch, backward = TOKENS // length, pass_ == "fwd+bwd"
        keys = jax.random.split(jax.random.key(0), 4)
        bshd = [jax.random.normal(key, (batch, length, HEADS, dim), jnp.bfloat16)
                for key in keys]
        bhsd = [jnp.swapaxes(x, 1, 2) for x in bshd]
        flops = attention_flops(batch, HEADS, length, dim, causal, backward)
        results, outputs, impls = {}, {}, implementations(causal)
        for name in args.impls:
            attend, layout = impls[name]
            operands = bhsd if layout == "bhsd" else bshd
            try:
                fn, compile_s = compiled(attend, backward, operands)
                seconds = gpu_seconds(fn, operands, args.repeats)
            except Exception as err:  # e.g. XLA running out of memory at 16k
                print(f"  {name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue
            if not backward:
                out = fn(*operands)
                outputs[name] = out if layout == "bhsd" else jnp.swapaxes(out, 1, 2)
            results[name] = seconds
            rows.append({"dim": dim, "S": length, "batch": batch, "causal": causal,
                         "pass": pass_, "impl": name, "ms": seconds * 1e3,
                         "tflops": flops / seconds / 1e12, "compile_s": compile_s})
        vs_cudnn = results.get("pallas_triton", np.nan) / results.get("cudnn", np.nan)
        diff = np.nan
        if "pallas_triton" in outputs and "cudnn" in outputs:
            diff = float(jnp.max(jnp.abs(outputs["pallas_triton"].astype(jnp.float32)
                                         - outputs["cudnn"].astype(jnp.float32))))
        cells = " ".join(f"{flops / results[n] / 1e12:>14.1f}" if n in results else f"{'-':>14}"
                         for n in args.impls)
        print(f"{dim:>4} {length:>6} {batch:>3} {str(causal):>6} {pass_:>8} {cells} "
              f"{vs_cudnn:>13.2f} {diff:>9.4f}", flush=True)
        (out_dir / "bench_attention_gpu.json").write_text(json.dumps(rows, indent=1))
    return rows


def check_targets(rows):
    """Prints whether Pallas Triton meets the forward targets at hd128, full attention."""
    for r in rows:
        if (r["impl"], r["dim"], r["causal"], r["pass"]) != ("pallas_triton", 128, False, "fwd"):
            continue
        cudnn = next((c for c in rows if c["impl"] == "cudnn" and c["dim"] == 128
                      and c["S"] == r["S"] and not c["causal"] and c["pass"] == "fwd"), None)
        slower = cudnn["tflops"] / r["tflops"] if cudnn else float("nan")
        ok = r["tflops"] >= TARGET_TFLOPS and slower <= TARGET_RATIO
        print(f"target S={r['S']}: pallas_triton {r['tflops']:.0f} TFLOP/s "
              f"(>= {TARGET_TFLOPS:.0f}), time vs cuDNN {slower:.2f}x (<= {TARGET_RATIO}): "
              f"{'met' if ok else 'NOT met'}")


def tune(args):
    """Times Pallas Triton tile configurations on one shape (hd128, S=16384, full, bf16)."""
    from transformax.attention.backends import pallas_triton
    from transformax.attention.problem import Problem
    length, dim = 16384, 128
    p = Problem(TOKENS // length, HEADS, HEADS, length, length, dim, dim, np.dtype(jnp.bfloat16),
                dim ** -0.5)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.random.normal(key, (p.batch, HEADS, length, dim), jnp.bfloat16)
                     for key in keys)
    forward_flops = attention_flops(p.batch, HEADS, length, dim, False, False)
    base = pallas_triton.default_config(p)
    print("forward: block_q block_k warps stages TFLOP/s")
    for bq, bk, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        cfg = dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=warps,
                                  num_stages=stages)
        fn = jax.jit(lambda q, k, v, cfg=cfg: pallas_triton.forward(p, q, k, v, None, None, cfg))
        try:
            seconds = gpu_seconds(fn, (q, k, v), args.repeats)
        except Exception as err:
            print(f"  {bq} {bk} {warps} {stages}: {type(err).__name__}")
            continue
        print(f"  {bq:>4} {bk:>4} {warps:>2} {stages:>2} {forward_flops / seconds / 1e12:8.1f}",
              flush=True)
    out, lse = jax.jit(lambda q, k, v: pallas_triton.forward(p, q, k, v, None, None))(q, k, v)
    dlse = jnp.zeros_like(lse)
    print("backward: q_dkv k_dkv q_dq k_dq warps stages TFLOP/s (backward alone, 2.5x forward)")
    for (qa, ka), (qb, kb), warps, stages in itertools.product(
            ((32, 128), (64, 64), (64, 128)), ((128, 32), (64, 64), (128, 64)), (4, 8), (2, 3)):
        cfg = dataclasses.replace(base, block_q_dkv=qa, block_k_dkv=ka, block_q_dq=qb,
                                  block_k_dq=kb, bwd_warps=warps, bwd_stages=stages)
        fn = jax.jit(lambda *a, cfg=cfg: pallas_triton.backward(p, *a, cfg))
        try:
            seconds = gpu_seconds(fn, (q, k, v, None, None, out, lse, dout, dlse), args.repeats)
        except Exception as err:
            print(f"  {qa} {ka} {qb} {kb} {warps} {stages}: {type(err).__name__}")
            continue
        print(f"  {qa:>4} {ka:>4} {qb:>4} {kb:>4} {warps:>2} {stages:>2} "
              f"{2.5 * forward_flops / seconds / 1e12:8.1f}", flush=True)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["dim"], r["pass"]) for r in rows}, key=lambda p: (-p[0], p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (dim, pass_) in zip(axes[0], panels):
        for impl, causal in itertools.product(dict.fromkeys(r["impl"] for r in rows),
                                              (False, True)):
            pts = sorted((r["S"], r["tflops"]) for r in rows if r["impl"] == impl
                         and r["dim"] == dim and r["pass"] == pass_ and r["causal"] == causal)
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="--" if causal else "-",
                        label=f"{impl}{' causal' if causal else ''}")
        ax.set(xscale="log", xlabel="S (B*S = 16384)", ylabel="TFLOP/s",
               title=f"head dim {dim}, {pass_}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 8192, 2048, 512])
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"],
                        choices=["fwd", "fwd+bwd"])
    parser.add_argument("--impls", nargs="+", default=["pallas_triton", "cudnn", "xla"],
                        choices=["pallas_triton", "tfx cudnn", "cudnn", "xla"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no further shape is started")
    parser.add_argument("--tune", action="store_true", help="sweep Pallas Triton tiles instead")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        sys.exit(f"needs a GPU; the default JAX backend is {jax.default_backend()}")
    if args.tune:
        tune(args)
        return
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep(args, out_dir)
    check_targets(rows)
    if rows:
        plot(rows, out_dir / "bench_attention_gpu.png")
    print(f"wrote {out_dir / 'bench_attention_gpu.json'} and {out_dir / 'bench_attention_gpu.png'}")


if __name__ == "__main__":
    main()
