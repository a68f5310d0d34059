"""The training run: set up (mesh, data, state or a resumed checkpoint), loop, observe, save.

Run folder ``out_dir/name``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``,
``samples.txt`` and, at the end, ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from transformax.train import config as config_lib
from transformax.train import data as data_lib
from transformax.train import optim, sharding
from transformax.train.checkpoint import Checkpoints
from transformax.train.metrics import MetricsLog, mfu, plot_losses
from transformax.train.samples import sample_text
from transformax.train.step import TrainState, init_state, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or Inf."""


@dataclasses.dataclass
class Result:
    state: TrainState
    run_dir: Path
    records: list[dict]  # this run's metric records (also in metrics.jsonl)
    train_step: jax.stages.Compiled  # the compiled step (HLO via .as_text())


def train(cfg: config_lib.RunConfig, *, resume: bool | None = None, stop_at: int | None = None,
          devices=None) -> Result:
    """Train as ``cfg`` says. ``resume``: None continues from the run folder's latest checkpoint
    if there is one, True requires one, False refuses to overwrite one. ``stop_at``: end this
    run (evaluated and saved) after that step; the schedule still spans ``train.steps``.
    ``devices``: the mesh's devices (default all)."""
    sharding.initialize_distributed()
    devices = jax.devices() if devices is None else devices
    config_lib.validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    run_dir = Path(cfg.out_dir) / cfg.name
    main = jax.process_index() == 0
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep)
    try:
        return _Run(cfg, mesh, run_dir, ckpts, main).run(_resume_step(ckpts, resume, run_dir),
                                                           stop_at)
    finally:
        ckpts.close()


def _resume_step(ckpts: Checkpoints, resume: bool | None, run_dir: Path) -> int | None:
    latest = ckpts.latest_step()
    if resume is True and latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if resume is False and latest is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints (latest step {latest}); "
                              f"resume it or choose another name=")
    return latest


def init_train_state(cfg: config_lib.RunConfig, tx) -> TrainState:
    """Step 0: fresh parameters (key ``fold_in(key(seed), 1)``) and optimizer state."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    return init_state(cfg.task.module.init(key, cfg.model_config), tx, cfg.seed)


def abstract_state(cfg: config_lib.RunConfig, tx, shardings=None) -> TrainState:
    """The train state's shapes and dtypes (with ``shardings``, if given): a restore target."""
    shapes = jax.eval_shape(functools.partial(init_train_state, cfg, tx))
    if shardings is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def load_run(run_dir: str | Path, step: int | None = None):
    """``(cfg, state)`` of a run folder's checkpoint ``step`` (default the latest), on the
    default device."""
    run_dir = Path(run_dir)
    cfg = config_lib.load(str(run_dir / "config.yaml"))
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep)
    try:
        if ckpts.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
        tx = optim.optimizer(cfg.optim, cfg.train.steps)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = abstract_state(cfg, tx, jax.tree.map(lambda _: device,
                                                      abstract_state(cfg, tx)))
        state, _ = ckpts.restore(target, step)
    finally:
        ckpts.close()
    return cfg, state


class _Run:
    """One run's pieces; :meth:`run` is the loop."""

    def __init__(self, cfg, mesh, run_dir: Path, ckpts: Checkpoints, main: bool):
        self.cfg, self.mesh, self.run_dir, self.ckpts, self.main = cfg, mesh, run_dir, ckpts, main
        self.task, self.model_cfg = cfg.task, cfg.model_config
        self.corpus = data_lib.load_corpus(cfg.data)
        t = cfg.train
        self.batches = data_lib.Batches(
            self.corpus, cfg.seed, (t.grad_accum, t.batch_size // t.grad_accum), cfg.data.seq_len,
            cfg.data.mlm_probability if self.task.objective == "mlm" else None)
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.tx = optim.optimizer(cfg.optim, t.steps)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.records: list[dict] = []

    def loss_fn(self, params, batch, rng):
        return self.task.loss(params, batch, self.model_cfg, rng)

    # --- setup -----------------------------------------------------------------------------
    def initial_state(self, resume_step: int | None) -> TrainState:
        init = functools.partial(init_train_state, self.cfg, self.tx)
        self.state_sharding = sharding.tree_shardings(jax.eval_shape(init), self.mesh)
        if resume_step is None:
            return jax.jit(init, out_shardings=self.state_sharding)()
        self.check_compatible(self.ckpts.saved_config(resume_step))
        target = abstract_state(self.cfg, self.tx, self.state_sharding)
        return self.ckpts.restore(target, resume_step)[0]

    def check_compatible(self, saved: dict) -> None:
        """A checkpoint continues exactly only under the same model, data and seed."""
        now = config_lib.to_dict(self.cfg)
        changed = [f"{section}.{k}" for section in ("model", "data")
                   for k in now[section] if saved[section].get(k) != now[section][k]]
        changed += ["seed"] if saved["seed"] != now["seed"] else []
        if changed:
            raise config_lib.ConfigError(
                f"{', '.join(changed)}: differ from the checkpoint in {self.ckpts_dir} "
                f"(resuming needs the same model, data and seed; use another name= for a new run)")

    @property
    def ckpts_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def put(self, batch: dict) -> dict:
        """A host batch as global arrays split over the batch shards."""
        return {k: jax.make_array_from_callback(v.shape, self.batch_sharding,
                                                lambda idx, v=v: v[idx])
                for k, v in batch.items()}

    def compile(self, state: TrainState):
        """AOT-compile the train and eval steps; returns the compile time in seconds."""
        t0 = time.perf_counter()
        example = self.put(self.batches(0))
        lr_schedule = optim.schedule(self.cfg.optim, self.cfg.train.steps)
        self.train_step = jax.jit(
            make_train_step(self.loss_fn, self.tx, lr_schedule),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, None), donate_argnums=0,
        ).lower(state, example).compile()
        params_sharding = self.state_sharding.params
        self.eval_step = jax.jit(make_eval_step(self.loss_fn),
                                 in_shardings=(params_sharding, self.batch_sharding),
                                 ).lower(state.params, example).compile()
        return time.perf_counter() - t0

    # --- the loop --------------------------------------------------------------------------
    def run(self, resume_step: int | None, stop_at: int | None) -> Result:
        cfg = self.cfg
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
            self.log.truncate_after(resume_step or 0)
        state = self.initial_state(resume_step)
        start = int(state.step)
        stop = self.stop = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        compile_s = self.compile(state)
        self.flops_per_token = self.task.flops_per_token(state.params, self.model_cfg,
                                                         cfg.data.seq_len)
        self.emit({"step": start, "event": "resumed" if resume_step else "started",
                   "compile_s": round(compile_s, 3), "devices": self.mesh.size,
                   "mesh": dict(self.mesh.shape)}, show=True)
        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (self.main and cfg.log.progress), file=sys.stderr)
        self.window = (time.perf_counter(), start)
        pending = []
        try:
            for step in range(start, stop):
                state, metrics = self.train_step(state, self.put(self.batches(step)))
                pending.append((step + 1, metrics))
                done, last = step + 1, step + 1 == stop
                evaluate = last or _every(done, cfg.eval.every)
                sample = self.task.decoder and (last or _every(done, cfg.sample.every))
                save = last or _every(done, cfg.checkpoint.every)
                # Metrics are read one step late, so the host never waits for the device
                # mid-loop, except before evaluating, sampling or saving.
                flush = pending if (evaluate or sample or save) else pending[:-1]
                self.observe(flush, bar)
                pending = pending[len(flush):]
                if evaluate:
                    self.timed(self.evaluate, state, done, bar)
                if sample:
                    self.timed(self.sample, state, done, bar)
                if save:
                    self.timed(self.ckpts.save, state, config_lib.to_dict(cfg))
        finally:
            bar.close()
            if self.main:
                plot_losses(self.log.read(), self.run_dir / "loss.png", title=cfg.name)
        return Result(state, self.run_dir, self.records, self.train_step)

    def observe(self, pending: list, bar) -> None:
        """Fetch finished steps' metrics: check them, advance the bar, log every ``log.every``."""
        for step, metrics in pending:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                last = self.ckpts.latest_step()
                kept = (f"the last good checkpoint is step {last} in {self.ckpts_dir}"
                        if last is not None else "no checkpoint was written")
                self.emit({"step": step, "event": "diverged", **m})
                raise TrainingDiverged(
                    f"training stopped: loss={m['loss']}, grad_norm={m['grad_norm']} at step "
                    f"{step}; {kept} (nothing after it was saved)")
            bar.update(1)
            if _every(step, self.cfg.log.every) or step == self.stop:
                now, (since, since_step) = time.perf_counter(), self.window
                tok_s = (step - since_step) * self.tokens_per_step / max(now - since, 1e-9)
                self.window = (now, step)
                m.update(tokens_per_s=round(tok_s, 1), mfu=round(mfu(
                    tok_s, self.flops_per_token, self.cfg.log.peak_tflops, self.mesh.size), 4))
                self.emit({"step": step, **m})
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}")

    def timed(self, fn, *args) -> None:
        """Run ``fn``, leaving its time out of the next tokens/s figure."""
        t0 = time.perf_counter()
        fn(*args)
        self.window = (self.window[0] + time.perf_counter() - t0, self.window[1])

    def evaluate(self, state: TrainState, step: int, bar) -> None:
        total = count = 0.0
        for i in range(self.cfg.eval.batches):
            s, c = self.eval_step(state.params, self.put(self.batches(i, data_lib.EVAL)))
            total, count = total + float(s), count + float(c)
        loss = total / max(count, 1.0)
        self.emit({"step": step, "eval_loss": loss}, show=True, bar=bar)

    def sample(self, state: TrainState, step: int, bar) -> None:
        if not self.corpus.is_bytes or self.cfg.sample.num == 0:
            return
        s = self.cfg.sample
        texts = sample_text(self.task, state.params, self.model_cfg, s.prompt, num=s.num,
                            max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_k=s.top_k,
                            rng=jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step))
        if self.main:
            with (self.run_dir / "samples.txt").open("a") as f:
                for text in texts:
                    f.write(f"=== step {step} ===\n{text}\n")
            for text in texts:
                bar.write(f"--- sample at step {step} ---\n{text}\n---")

    def emit(self, record: dict, show: bool = False, bar=None) -> None:
        self.records.append(record)
        if not self.main:
            return
        self.log.write(record)
        if show:
            text = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in record.items())
            (bar.write if bar is not None else print)(text)


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
