"""The training run: set up (mesh, data, state or a resumed checkpoint), loop, observe, save.

Run folder ``out_dir/name``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``,
``samples.txt``, at the end ``loss.png``, and while a run holds it ``run.lock``.

Nothing is written there until the run is accepted: the config, the data and, on resume, the
checkpoint's config are all checked first, so a refused run leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
import warnings
from pathlib import Path

import jax
from tqdm.auto import tqdm

from transformax import tokenizer as tokenizer_lib
from transformax.train import config as config_lib
from transformax.train import data as data_lib
from transformax.train import optim, profiling, sharding, sources
from transformax.train.checkpoint import Checkpoints
from transformax.train.interrupt import Interrupted, stop_on_signals
from transformax.train.metrics import MetricsLog, mfu, plot_losses
from transformax.train.runlock import run_lock
from transformax.train.samples import sample_text
from transformax.train.tensorboard import EventWriter
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
    ``devices``: the mesh's devices (default all).

    A second run on the same folder raises :class:`~transformax.train.runlock.RunFolderBusy`.
    A latest checkpoint that does not restore is set aside (with a warning) for the newest one
    that does. SIGINT / SIGTERM end the run after the current step: the state is saved and
    :class:`~transformax.train.interrupt.Interrupted` raised (a second signal exits at once).
    In a multi-process run, a process that stops makes the others raise
    :class:`~transformax.train.sharding.PeerLost` at their next collective."""
    with stop_on_signals() as stop_request:
        sharding.initialize_distributed(cfg.dist)
        devices = jax.devices() if devices is None else devices
        config_lib.validate(cfg, len(devices))
        mesh = sharding.make_mesh(cfg.mesh, devices)
        run_dir = Path(cfg.out_dir) / cfg.name
        main = jax.process_index() == 0
        tokenizer, corpus = sources.tokenize(cfg.data, data_lib.load_corpus(cfg.data), run_dir)
        _check_prompt(cfg, tokenizer)
        with run_lock(run_dir) if main else contextlib.nullcontext():
            ckpts = Checkpoints(run_dir / "checkpoints", cfg.checkpoint.keep)
            try:
                run = _Run(cfg, mesh, run_dir, ckpts, main, corpus, stop_request, tokenizer)
                return run.run(resume, stop_at)
            except jax.errors.JaxRuntimeError as err:
                lost = sharding.peer_lost(err)
                if lost is None:
                    raise
                raise lost from err
            finally:
                ckpts.close()


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
        if step is None:
            state = ckpts.restore_newest(target)[0]
        else:
            state, _ = ckpts.restore(target, step)
    finally:
        ckpts.close()
    return cfg, state


class _Run:
    """One run's pieces; :meth:`run` is the loop."""

    def __init__(self, cfg, mesh, run_dir: Path, ckpts: Checkpoints, main: bool,
                 corpus: data_lib.Corpus, stop_request, tokenizer=None):
        self.cfg, self.mesh, self.run_dir, self.ckpts, self.main = cfg, mesh, run_dir, ckpts, main
        self.task, self.model_cfg = cfg.task, cfg.model_config
        self.corpus, self.stop_request, self.tokenizer = corpus, stop_request, tokenizer
        t = cfg.train
        self.batches = data_lib.Batches(
            self.corpus, cfg.seed, (t.grad_accum, t.batch_size // t.grad_accum), cfg.data.seq_len,
            cfg.data.mlm_probability if self.task.objective == "mlm" else None,
            cfg.data.packing)
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.tx = optim.optimizer(cfg.optim, t.steps)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.tensorboard = EventWriter(run_dir / "tensorboard") if cfg.log.tensorboard else None
        self.records: list[dict] = []

    def loss_fn(self, params, batch, rng):
        return self.task.loss(params, batch, self.model_cfg, rng)

    # --- setup -----------------------------------------------------------------------------
    def initial_state(self, resume: bool | None) -> tuple[TrainState, list[int]]:
        """Fresh or restored (see :func:`train`'s ``resume``), and the damaged checkpoint steps
        skipped. Reads the run folder only."""
        init = functools.partial(init_train_state, self.cfg, self.tx)
        self.state_sharding = sharding.tree_shardings(jax.eval_shape(init), self.mesh)
        latest = self.ckpts.latest_step()
        if latest is None:
            if resume is True:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpts_dir}")
            if self.cfg.model.init_from:  # fine-tuning: step 0 from those weights
                params = sources.initial_params(self.cfg.model.init_from, self.task.module,
                                                self.model_cfg)
                init = functools.partial(init_state, tx=self.tx, seed=self.cfg.seed)
                return jax.jit(init, out_shardings=self.state_sharding)(params), []
            return jax.jit(init, out_shardings=self.state_sharding)(), []
        if resume is False:
            raise FileExistsError(f"{self.run_dir} already has checkpoints (latest step "
                                  f"{latest}); resume it or choose another name=")
        target = abstract_state(self.cfg, self.tx, self.state_sharding)
        state, _, step, damaged = self.ckpts.restore_newest(target, self.check_compatible)
        _check_schedule(step, self.cfg.train.steps, self.ckpts_dir)
        return state, damaged

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
    def run(self, resume: bool | None, stop_at: int | None) -> Result:
        cfg = self.cfg
        state, damaged = self.initial_state(resume)
        start = int(state.step)
        if self.main:  # accepted: from here on the run folder is written
            for step in damaged:
                moved = self.ckpts.set_aside(step, self.run_dir / "damaged_checkpoints")
                warnings.warn(f"damaged checkpoint step {step} moved to {moved}",
                              RuntimeWarning, stacklevel=2)
            (self.run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
            if self.tokenizer is not None:
                self.tokenizer.save(self.run_dir)
            self.log.truncate_after(start)
        stop = self.stop = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        compile_s = self.compile(state)
        self.flops_per_token = self.task.flops_per_token(state.params, self.model_cfg,
                                                         cfg.data.seq_len)
        if self.main and cfg.log.progress:
            print(f"--- {self.run_dir / 'config.yaml'} ---\n{config_lib.to_yaml(cfg)}---")
        self.emit({"step": start, "event": "resumed" if start else "started",
                   "compile_s": round(compile_s, 3),
                   "params": self.task.module.num_params(state.params),
                   "tokenizer": "ids" if self.tokenizer is None else self.tokenizer.name,
                   "devices": self.mesh.size, "platform": self.mesh.devices.flat[0].platform,
                   "mesh": dict(self.mesh.shape)}, show=True)
        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (self.main and cfg.log.progress), file=sys.stderr)
        self.window = (time.perf_counter(), start)
        pending = []
        trace = profiling.StepTrace(cfg.log.profile, self.run_dir / "profile")
        try:
            for step in range(start, stop):
                if self.stop_request:
                    break
                trace.before(step)
                state, metrics = self.train_step(state, self.put(self.batches(step)))
                trace.after(step, state)
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
            if self.stop_request and int(state.step) < stop:
                self.observe(pending, bar)
                raise Interrupted(self.stop_request.signum, self.save_on_stop(state, start))
        finally:
            trace.close()
            bar.close()
            if self.main:
                plot_losses(self.log.read(), self.run_dir / "loss.png", title=cfg.name)
        return Result(state, self.run_dir, self.records, self.train_step)

    def save_on_stop(self, state: TrainState, start: int) -> str:
        """Save the state the loop stopped with; a line saying what was kept."""
        step = int(state.step)
        self.emit({"step": step, "event": f"stopped ({self.stop_request.name})"})
        where = f"{self.stop_request.name}: stopped at step {step}"
        if step == start and self.ckpts.latest_step() is None:
            return f"{where} before any step completed; nothing to save"
        self.ckpts.save(state, config_lib.to_dict(self.cfg))
        return (f"{where}; saved checkpoint {self.ckpts_dir / str(step)} (run the same command "
                f"again to resume)")

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
        # perplexity per token; for byte tokens also bits per byte
        extra = ({"eval_bpb": loss / math.log(2)} if self.tokenizer is tokenizer_lib.BYTES
                 else {})
        self.emit({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
                   **extra}, show=True, bar=bar)

    def sample(self, state: TrainState, step: int, bar) -> None:
        if self.tokenizer is None or self.cfg.sample.num == 0:
            return
        s = self.cfg.sample
        texts = sample_text(self.task, state.params, self.model_cfg, s.prompt, self.tokenizer,
                            num=s.num,
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
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if show:
            text = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in record.items())
            (bar.write if bar is not None else print)(text)


def _check_prompt(cfg: config_lib.RunConfig, tokenizer) -> None:
    """Samples are drawn at the end too: a prompt that cannot be sampled from is refused before
    the first step, not after the last."""
    if tokenizer is None or not cfg.task.decoder or cfg.sample.num == 0:
        return
    model_cfg = cfg.model_config
    n, positions = len(tokenizer.encode(cfg.sample.prompt)), model_cfg.max_len
    if not 0 < n < positions:
        raise config_lib.ConfigError(
            f"sample.prompt={cfg.sample.prompt!r}: {n} tokens; expected 1 to {positions - 1} (the "
            f"model's {model_cfg.max_len_field}={positions} less room for a new token), or "
            f"sample.num=0")


def _check_schedule(step: int, steps: int, ckpts_dir: Path) -> None:
    if step > steps:
        raise config_lib.ConfigError(
            f"train.steps={steps}: the checkpoint to resume in {ckpts_dir} is at step {step}, "
            f"past the end of the schedule; set train.steps >= {step}")


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
