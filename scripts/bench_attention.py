"""Attention benchmark on CPU: tfx.sdpa (auto and each CPU kernel) against torch's SDPA and
jax.nn.dot_product_attention, same inputs, same process, timed in interleaved rounds (every
implementation once per round, so machine noise hits all alike), medians.

    python scripts/bench_attention.py                      # L = 512 (B=4) .. 8192, causal and full
    python scripts/bench_attention.py --lengths 2048 --kv-heads 2 --dim 128   # GQA, E=128
    python scripts/bench_attention.py --gpu ...            # the GPU sweep (bench_attention_gpu.py)
    python scripts/bench_attention.py --masks --lengths 4096 --window 512 --docs 8
    python scripts/bench_attention.py --masks --lengths 32768 --heads 2 --window 4096 --rounds 3

``--masks`` times structured masks instead: causal, a sliding window, documents and causal
documents, each through tfx.sdpa's built-in mask (auto, xla_flash), through tfx.flex_attention
given the same mask as a mask_mod (a block mask made once, passed to the jitted call) and
through torch's compiled ``flex_attention`` with that mask_mod (forward only: it has no CPU
backward), with each time's ratio to the same implementation's causal time and to torch flex's.

Prints the host (CPU model, ISA, cache sizes, cores, versions, ISA-limiting variables) and a
table of each implementation's time and its ratio to torch; writes JSON and a PNG to --out.
To emulate an AVX2-only host on an AVX-512 one: XLA_FLAGS=--xla_cpu_max_isa=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (torch's GEMMs are MKL's, which ignores
ATEN_CPU_CAPABILITY).
"""

from __future__ import annotations

import argparse
import contextlib
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

from transformax import host

ISA_VARIABLES = ("XLA_FLAGS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                 "TRANSFORMAX_CPU_ISA")


def interleaved_medians(runs: dict, rounds: int) -> dict:
    """Median seconds of each ``runs[name]()``, timed in turn once per round. Each timed call
    follows an untimed one of the same implementation, so the previous library's still-spinning
    worker threads (OpenMP) do not slow it."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def jax_callable(attend, q, k, v, backward: bool, *rest):
    """Jitted ``attend(q, k, v, *rest)`` (``rest``: traced operands such as a block mask), or
    its gradient in q, k, v; and its compile time."""
    if backward:
        f = jax.jit(jax.grad(lambda q, k, v, *rest: jnp.sum(attend(q, k, v, *rest)),
                             argnums=(0, 1, 2)))
    else:
        f = jax.jit(attend)
    start = time.perf_counter()
    jax.block_until_ready(f(q, k, v, *rest))
    compile_s = time.perf_counter() - start
    return (lambda: jax.block_until_ready(f(q, k, v, *rest))), compile_s


def torch_callable(torch, q, k, v, causal: bool, backward: bool):
    tq, tk, tv = (torch.tensor(np.asarray(x), requires_grad=backward) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = q.shape[1] != k.shape[1]

    def run():
        if backward:
            sdpa(tq, tk, tv, is_causal=causal, enable_gqa=gqa).sum().backward()
        else:
            with torch.no_grad():
                sdpa(tq, tk, tv, is_causal=causal, enable_gqa=gqa)
    run()  # warm-up
    return run


def implementations(causal: bool, gqa: bool):
    import transformax as tfx

    def tfx_with(backend):
        def attend(q, k, v):
            if backend is None:
                return tfx.sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
            with tfx.sdpa_kernel(backend):
                return tfx.sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
        return attend

    return {
        "tfx auto": tfx_with(None),
        "tfx cpu_flash": tfx_with(tfx.Backend.CPU_FLASH),
        "tfx xla_flash": tfx_with(tfx.Backend.XLA_FLASH),
        "tfx math": tfx_with(tfx.Backend.MATH),
        "jax.nn": lambda q, k, v: jnp.swapaxes(jax.nn.dot_product_attention(
            *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), is_causal=causal), 1, 2),
    }


def mask_cases(length: int, window: int, docs: int) -> tuple[dict, np.ndarray]:
    """name -> (tfx.sdpa keyword arguments of the built-in mask, ``make(ids)``: the same mask as
    a mask_mod over an array of document ids, torch's or jnp's); and the document ids."""
    import transformax as tfx
    ids = np.repeat(np.arange(docs), -(-length // docs))[:length]
    return {
        "causal": (dict(is_causal=True), lambda ids: lambda b, h, q_idx, kv_idx: q_idx >= kv_idx),
        f"window {window}": (
            dict(attn_mask=tfx.sliding_window(length, length, window)),
            lambda ids: lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window)),
        f"{docs} docs": (
            dict(attn_mask=tfx.document_mask(ids[None])),
            lambda ids: lambda b, h, q_idx, kv_idx: ids[q_idx] == ids[kv_idx]),
        f"{docs} docs causal": (
            dict(attn_mask=tfx.document_mask(ids[None]) & tfx.causal_upper_left(length, length)),
            lambda ids: lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx)
            & (ids[q_idx] == ids[kv_idx])),
    }, ids


def torch_flex_callable(torch, q, k, v, mask_mod):
    """torch.compile(flex_attention) with ``mask_mod``'s block mask, forward only."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    tq, tk, tv = (torch.tensor(np.asarray(x)) for x in (q, k, v))
    block_mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)  # dynamic: a C++ compile error

    def run():
        with torch.no_grad():
            flex(tq, tk, tv, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def run_masks(args, q, k, v, rows):
    """The ``--masks`` table for one length: every case and implementation in the same
    interleaved rounds per pass. "tfx flex" is ``tfx.flex_attention`` given the case's mask_mod
    as a ``create_block_mask`` made once and passed to the jitted call (as a layer loop does)."""
    import torch

    import transformax as tfx
    length = q.shape[2]
    cases, ids = mask_cases(length, args.window, args.docs)
    backends = {"tfx auto": None, "tfx xla_flash": tfx.Backend.XLA_FLASH}
    gqa = q.shape[1] != k.shape[1]

    def attend_with(kwargs, backend):
        def attend(q, k, v):
            with tfx.sdpa_kernel(backend) if backend else contextlib.nullcontext():
                return tfx.sdpa(q, k, v, enable_gqa=gqa, **kwargs)
        return attend

    def flex(q, k, v, block_mask):
        return tfx.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    for backward in (False,) if args.no_backward else (False, True):
        runs, compile_s = {}, {}
        for case, (kwargs, make_mask_mod) in cases.items():
            for impl, backend in backends.items():
                if impl not in args.skip:
                    runs[(case, impl)], compile_s[(case, impl)] = jax_callable(
                        attend_with(kwargs, backend), q, k, v, backward)
            if "tfx flex" not in args.skip:
                block_mask = tfx.create_block_mask(make_mask_mod(jnp.asarray(ids)), None, None,
                                                   length, length)
                runs[(case, "tfx flex")], compile_s[(case, "tfx flex")] = jax_callable(
                    flex, q, k, v, backward, block_mask)
            if not backward and "torch flex" not in args.skip:
                runs[(case, "torch flex")], compile_s[(case, "torch flex")] = (
                    torch_flex_callable(torch, q, k, v, make_mask_mod(torch.tensor(ids))))
        medians = interleaved_medians(runs, args.rounds)
        for (case, impl), seconds in medians.items():
            flex, builtin = medians.get((case, "torch flex")), medians.get((case, "tfx auto"))
            row = {"B": q.shape[0], "L": length, "mask": case,
                   "pass": "fwd+bwd" if backward else "fwd", "impl": impl, "ms": seconds * 1e3,
                   "ratio_to_causal": seconds / medians[("causal", impl)],
                   "ratio_to_torch_flex": seconds / flex if flex else None,
                   "ratio_to_builtin": seconds / builtin if builtin else None,
                   "compile_s": compile_s[(case, impl)]}
            rows.append(row)
            ratios = ("" if r is None else f"{r:.2f}"
                      for r in (row["ratio_to_torch_flex"], row["ratio_to_builtin"]))
            print(f"{row['B']:>2} {length:>6} {case:<16} {row['pass']:>8} {impl:<14} "
                  f"{row['ms']:>9.1f} {row['ratio_to_causal']:>8.2f} {next(ratios):>8} "
                  f"{next(ratios):>9} {row['compile_s']:>9.2f}", flush=True)


def attention_flops(batch, heads, length, dim, causal, backward) -> float:
    flops = 4.0 * batch * heads * length * length * dim
    flops = flops / 2 if causal else flops
    return flops * 3.5 if backward else flops


def host_record() -> dict:
    import torch
    return {**host.current().as_json(), "torch_threads": torch.get_num_threads(),
            "variables": {name: os.environ.get(name) for name in ISA_VARIABLES}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="run scripts/bench_attention_gpu.py with the other arguments")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 4 for L <= 512, else 1)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip", nargs="*", default=[],
                        help="implementations to leave out, e.g. 'tfx math' 'jax.nn'")
    parser.add_argument("--max-materialised-gib", type=float, default=4.0,
                        help="skip kernels that materialise scores larger than this")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--masks", action="store_true",
                        help="time structured masks (causal, window, documents) and the same "
                             "mask_mods through flex_attention instead")
    parser.add_argument("--window", type=int, default=512, help="--masks: sliding window")
    parser.add_argument("--docs", type=int, default=8, help="--masks: documents per sequence")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
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
    kv_heads = args.kv_heads or args.heads
    record = host_record()
    print(f"host: {host.current().describe()}\nvariables: {record['variables']}\n"
          f"f32, H={args.heads}, Hk={kv_heads}, E={args.dim}, {args.rounds} interleaved rounds, "
          f"medians")
    if args.masks:
        print(f"{'B':>2} {'L':>6} {'mask':<16} {'pass':>8} {'implementation':<14} {'ms':>9} "
              f"{'x causal':>8} {'x flex':>8} {'x builtin':>9} {'compile s':>9}")
    else:
        print(f"{'B':>2} {'L':>6} {'causal':>6} {'pass':>8} {'implementation':<15} {'ms':>9} "
              f"{'GF/s':>7} {'x torch':>8} {'compile s':>9}")
    for length in args.lengths:
        batch = args.batch or (4 if length <= 512 else 1)
        q = jnp.asarray(rng.standard_normal((batch, args.heads, length, args.dim)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, length, args.dim)),
                            jnp.float32) for _ in range(2))
        if args.masks:
            run_masks(args, q, k, v, rows)
            continue
        scores_gib = batch * args.heads * length * length * 4 / 2**30
        for causal in (True, False):
            for backward in (False,) if args.no_backward else (False, True):
                flops = attention_flops(batch, args.heads, length, args.dim, causal, backward)
                runs = {"torch sdpa": torch_callable(torch, q, k, v, causal, backward)}
                compile_s = {"torch sdpa": 0.0}
                for name, attend in implementations(causal, kv_heads != args.heads).items():
                    materialises = name in ("tfx math", "jax.nn")
                    if name in args.skip or (materialises
                                             and scores_gib * 3 > args.max_materialised_gib):
                        continue
                    runs[name], compile_s[name] = jax_callable(attend, q, k, v, backward)
                medians = interleaved_medians(runs, args.rounds)
                for name, seconds in medians.items():
                    row = {"B": batch, "L": length, "causal": causal,
                           "pass": "fwd+bwd" if backward else "fwd", "impl": name,
                           "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
                           "ratio_to_torch": seconds / medians["torch sdpa"],
                           "compile_s": compile_s[name]}
                    rows.append(row)
                    print(f"{batch:>2} {length:>6} {str(causal):>6} {row['pass']:>8} {name:<15} "
                          f"{row['ms']:>9.1f} {row['gflops']:>7.1f} "
                          f"{row['ratio_to_torch']:>8.2f} {row['compile_s']:>9.2f}", flush=True)
    stem = f"bench_attention{'_masks' if args.masks else ''}{args.tag}"
    result = {"host": record, "heads": args.heads, "kv_heads": kv_heads, "dim": args.dim,
              "rounds": args.rounds, "rows": rows}
    if args.masks:
        result.update(window=args.window, docs=args.docs)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    if not args.masks:
        plot(rows, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json")


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
