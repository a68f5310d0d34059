"""Tokens/s of the transformax train step (jitted, and not jitted) against the same GPT and AdamW
step in PyTorch, eager and under ``torch.compile``: same weights, same batch, one process.

    python scripts/bench_train.py [--configs A B] [--iters 5] [--out bench_out/train.json]

A = 6 layers, 6 heads, width 384, context 256, vocab 256, batch 16; B = 4 layers, 8 heads,
width 512, context 1024, vocab 256, batch 4; f32, AdamW with global-norm clipping. Medians
after warm-up; jit, eager and compiled are timed in interleaved rounds (each round starting with
one untimed step) so machine noise hits all of them alike. Prints a table with the ratios and
writes JSON. Runs with the train command's malloc setting (``transformax.cli.tune_malloc``).
A variant whose first two losses differ from the jitted step's is reported as wrong, and no ratio
is printed for it (its time measures other arithmetic).

Under ``ATEN_CPU_CAPABILITY=avx2`` (the AVX2 host setting) ``torch.compile`` is told to generate
256-bit vector code: left to pick the width itself there, torch 2.13's inductor steps gave NaN
losses on the AVX-512 host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from transformax import host, train
from transformax.cli import tune_malloc

CONFIGS = {
    "A": dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, batch=16),
    "B": dict(n_layer=4, n_head=8, n_embd=512, seq_len=1024, batch=4),
}
VOCAB, LR, WD, CLIP, BETAS, EPS = 256, 3e-4, 0.1, 1.0, (0.9, 0.95), 1e-8
SIMD_BITS = {"avx2": 256, "avx512": 512}  # ATEN_CPU_CAPABILITY -> inductor's cpp.simdlen


def run_config(c: dict) -> train.RunConfig:
    return train.load(None, [
        "model.arch=gpt", f"model.vocab_size={VOCAB}", f"model.n_layer={c['n_layer']}",
        f"model.n_head={c['n_head']}", f"model.n_embd={c['n_embd']}",
        f"model.block_size={c['seq_len']}", f"data.seq_len={c['seq_len']}",
        f"train.batch_size={c['batch']}", "train.steps=1000", "optim.warmup_steps=0",
        f"optim.lr={LR}", "optim.min_lr_ratio=1.0", f"optim.weight_decay={WD}",
        f"optim.grad_clip={CLIP}", f"optim.b1={BETAS[0]}", f"optim.b2={BETAS[1]}",
        f"optim.eps={EPS}", "optim.decay_norms_and_biases=true", "optim.no_decay=[]"])


def jax_step(cfg: train.RunConfig):
    """``(step_fn, state, batch)`` for the transformax train step on one fixed batch."""
    from transformax.train import optim
    from transformax.train.loop import init_train_state
    from transformax.train.step import make_train_step

    tx = optim.optimizer(cfg.optim, cfg.train.steps)
    task, model_cfg = cfg.task, cfg.model_config

    def loss_fn(p, b, r):
        return task.loss(p, b, model_cfg, r)

    step = make_train_step(loss_fn, tx, optim.schedule(cfg.optim, cfg.train.steps))
    state = init_train_state(cfg, tx)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (1, cfg.train.batch_size, cfg.data.seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[..., :-1], jnp.int32),
             "targets": jnp.asarray(tokens[..., 1:], jnp.int32)}
    return step, state, batch


def torch_step(cfg: train.RunConfig, params: dict, batch: dict, compile: bool):
    """``step() -> loss`` for a PyTorch GPT with ``params``' weights (SDPA, is_causal) and
    AdamW (foreach) with the same hyperparameters; compiled with ``torch.compile`` if asked."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    m = cfg.model
    d, h = m.n_embd, m.n_head

    def t(x):
        return torch.nn.Parameter(torch.tensor(np.asarray(x, np.float32)))

    class Block(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.fc, self.proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            for name, src in (("ln_1", p["ln_1"]), ("ln_2", p["ln_2"])):
                norm = getattr(self, name)
                norm.weight, norm.bias = t(src["scale"]), t(src["bias"])
            for name, src in (("qkv", p["attn"]["qkv"]), ("out", p["attn"]["out"]),
                              ("fc", p["mlp"]["fc"]), ("proj", p["mlp"]["proj"])):
                getattr(self, name).weight = t(np.asarray(src["w"]).T)
                getattr(self, name).bias = t(src["b"])

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(self.ln_1(x)).split(d, -1)
            q, k, v = (z.view(b, n, h, d // h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(y.transpose(1, 2).reshape(b, n, d))
            return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = t(params["wte"]), t(params["wpe"])
            self.blocks = torch.nn.ModuleList(Block(p) for p in params["blocks"])
            self.ln_f = torch.nn.LayerNorm(d)
            self.ln_f.weight, self.ln_f.bias = t(params["ln_f"]["scale"]), t(params["ln_f"]["bias"])

        def forward(self, idx, targets):
            x = self.wte[idx] + self.wpe[: idx.shape[1]]
            for blk in self.blocks:
                x = blk(x)
            logits = self.ln_f(x) @ self.wte.T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    x = torch.tensor(np.asarray(batch["inputs"][0]), dtype=torch.long)
    y = torch.tensor(np.asarray(batch["targets"][0]), dtype=torch.long)

    def step():
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss

    if not compile:
        return lambda: float(step())
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if capability in SIMD_BITS:
        import torch._inductor.config

        torch._inductor.config.cpp.simdlen = SIMD_BITS[capability]
    fn = torch.compile(step)
    return lambda: float(fn())


def timed(fn, n: int) -> list[tuple[float, float, float]]:
    """``n`` calls of ``fn``: (wall, user CPU, system CPU) seconds of each."""
    out = []
    for _ in range(n):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out.append((time.perf_counter() - t0, r1.ru_utime - r0.ru_utime,
                    r1.ru_stime - r0.ru_stime))
    return out


def bench(name: str, c: dict, iters: int, rounds: int, nojit_iters: int, skip: set) -> dict:
    cfg = run_config(c)
    step, state, batch = jax_step(cfg)
    params0 = jax.tree.map(np.asarray, state.params)
    tokens = c["batch"] * c["seq_len"]
    flops = tokens * cfg.task.flops_per_token(state.params, cfg.model_config, c["seq_len"])
    runners, losses, compile_s = {}, {}, {}

    # Each runner: one call = one optimizer step, blocking until done; returns the loss.
    t0 = time.perf_counter()
    jitted = jax.jit(step, donate_argnums=0)
    holder = {"state": jax.tree.map(jnp.array, state)}

    def run_jit():
        holder["state"], m = jitted(holder["state"], batch)
        return float(m["loss"])

    losses["jax_jit"] = [run_jit()]
    compile_s["jax_jit"] = time.perf_counter() - t0
    runners["jax_jit"] = run_jit
    if "torch" not in skip:
        for key, comp in (("torch_eager", False), ("torch_compile", True)):
            if key == "torch_compile" and "compile" in skip:
                continue
            t0 = time.perf_counter()
            runners[key] = torch_step(cfg, params0, batch, comp)
            losses[key] = [runners[key]()]
            compile_s[key] = time.perf_counter() - t0
    for key, fn in runners.items():
        losses[key].append(fn())
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            fn()  # untimed: the first step after another framework's runs slower
            times[key] += timed(fn, iters)
    if "nojit" not in skip:
        nojit_state = {"state": jax.tree.map(jnp.array, state)}

        def run_nojit():
            nojit_state["state"], m = step(nojit_state["state"], batch)
            return float(m["loss"])

        losses["jax_nojit"] = [run_nojit(), run_nojit()]
        times["jax_nojit"] = timed(run_nojit, nojit_iters)
    ref = losses["jax_jit"]
    wrong = [k for k, v in losses.items()
             if not np.allclose(v[:2], ref[:2], rtol=1e-3, atol=1e-3)]
    result = {"config": name, **c, "vocab": VOCAB, "tokens_per_step": tokens,
              "gflop_per_step": flops / 1e9, "first_losses": losses, "wrong_losses": wrong,
              "compile_s": compile_s, "variants": {}}
    for key, ts in times.items():
        wall, user, sys_ = (list(x) for x in zip(*ts))
        med = statistics.median(wall)
        result["variants"][key] = {
            "median_s": med, "tokens_per_s": tokens / med, "gflop_per_s": flops / med / 1e9,
            "user_s": statistics.median(user), "sys_s": statistics.median(sys_),
            "times_s": wall}
    return result


def ratios(r: dict) -> dict:
    v = {k: x["tokens_per_s"] for k, x in r["variants"].items()}
    pairs = (("jit/compile", "jax_jit", "torch_compile"), ("jit/eager", "jax_jit", "torch_eager"),
             ("jit/nojit", "jax_jit", "jax_nojit"),
             ("compile/eager", "torch_compile", "torch_eager"))
    ok = set(v) - set(r["wrong_losses"])
    return {n: v[a] / v[b] for n, a, b in pairs if a in ok and b in ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--iters", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--nojit-iters", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["torch", "compile", "nojit"])
    ap.add_argument("--out", default="bench_out/train.json")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="skip the train command's GLIBC_TUNABLES (see transformax.cli)")
    args = ap.parse_args()
    if not args.no_malloc_tuning:
        tune_malloc()
    print(f"host: {host.current().describe()}")
    results = []
    for name in args.configs:
        r = bench(name, CONFIGS[name], args.iters, args.rounds, args.nojit_iters, set(args.skip))
        r["ratios"] = ratios(r)
        results.append(r)
        print(f"\nconfig {name}: {CONFIGS[name]}  ({r['gflop_per_step']:.0f} GFLOP/step)")
        print(f"{'variant':<14} {'tokens/s':>10} {'GF/s':>8} {'median s':>9} {'user s':>7} "
              f"{'sys s':>6} {'compile s':>9}  first losses")
        for k, x in r["variants"].items():
            print(f"{k:<14} {x['tokens_per_s']:>10.0f} {x['gflop_per_s']:>8.1f} "
                  f"{x['median_s']:>9.3f} {x['user_s']:>7.2f} {x['sys_s']:>6.2f} "
                  f"{r['compile_s'].get(k, float('nan')):>9.1f}  "
                  + " ".join(f"{loss:.4f}" for loss in r["first_losses"][k]))
        for k in r["wrong_losses"]:
            print(f"WRONG: {k}'s first losses differ from jax_jit's; no ratio for it")
        print("  ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "ATEN_CPU_CAPABILITY",
                                          "MKL_ENABLE_INSTRUCTIONS", "TRANSFORMAX_CPU_ISA")}
    out.write_text(json.dumps({"host": host.current().as_json(), "env": env,
                               "results": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
