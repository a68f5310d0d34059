"""Decode tokens/s of ``transformax.generate`` (prefill + jitted ``lax.while_loop`` over a
preallocated KV cache) against Hugging Face ``GPT2LMHeadModel.generate`` with its KV cache:
same random GPT-2-small-shaped weights, same prompt, greedy, one process.

    python scripts/bench_generate.py [--batch 1] [--prompt-len 8] [--new-tokens 32]
                                     [--repeats 5] [--torch-threads N] [--out FILE.json]

Times the whole call (prefill + all new tokens), medians after warm-up, transformax and torch
interleaved so machine noise hits both alike; compile time is reported separately. Prints a
table with the ratio and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from transformax import generate  # noqa: E402
from transformax.models import gpt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench_out/generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)

    hf_cfg = transformers.GPT2Config(bos_token_id=None, eos_token_id=None)  # GPT-2 small shape
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    _, params, cfg = gpt.from_hf(model)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len),
                                               dtype=np.int32)
    n = args.new_tokens
    prompt_t = torch.as_tensor(prompt, dtype=torch.long)

    def run_tfx():
        return np.asarray(generate.generate(gpt, params, cfg, prompt, max_new_tokens=n,
                                            temperature=0))

    def run_hf():
        with torch.no_grad():
            out = model.generate(prompt_t, attention_mask=torch.ones_like(prompt_t),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        return out[:, args.prompt_len:].numpy()

    start = time.perf_counter()
    ours = run_tfx()
    compile_s = time.perf_counter() - start
    same = bool((ours == run_hf()).all())
    times = {"transformax": [], "hf_torch": []}
    for _ in range(args.repeats):
        for name, fn in (("transformax", run_tfx), ("hf_torch", run_hf)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: args.batch * n / v for k, v in med.items()}
    ratio = tps["transformax"] / tps["hf_torch"]

    print(f"GPT-2 small shape (124M, f32), batch {args.batch}, prompt {args.prompt_len}, "
          f"{n} new tokens, greedy, {os.cpu_count()} CPUs, torch threads {args.torch_threads}; "
          f"medians of {args.repeats}")
    print(f"{'implementation':<14} {'s/call':>8} {'tokens/s':>9}")
    for k in med:
        print(f"{k:<14} {med[k]:8.3f} {tps[k]:9.1f}")
    print(f"ratio transformax / hf_torch: {ratio:.2f}x; first call (compile + run) "
          f"{compile_s:.1f} s; same greedy tokens: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": n,
        "repeats": args.repeats, "seconds": times, "median_s": med, "tokens_per_s": tps,
        "ratio": ratio, "first_call_s": compile_s, "same_tokens": same,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
