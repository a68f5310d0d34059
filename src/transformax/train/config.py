"""The training schema as dataclasses; YAML and ``a.b=c`` overrides merged onto it strictly.

``load(path, overrides)`` returns a validated :class:`RunConfig`. Any problem (an unknown key, a
wrong type, an impossible value) raises :class:`ConfigError` naming the key and what is allowed,
before anything is compiled. The ``model`` section holds the chosen architecture's own ``Config``
fields (``transformax.models.<arch>.Config``) plus ``arch``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from transformax.train import profiling
from transformax.train.tasks import TASKS

DATA_SOURCES = ("stdlib", "text", "bin")
BIN_DTYPES = ("uint16", "uint32")
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
    """A configuration problem, naming the key and the allowed values."""


@dataclasses.dataclass
class DataConfig:
    """``source``: ``stdlib`` (bytes of the running Python's standard library ``.py`` files),
    ``text`` (bytes of the files a path, folder or glob names) or ``bin`` (nanoGPT-style
    ``train.bin`` / ``val.bin`` token files in the folder ``path``). ``tokenizer``: ``bytes``,
    ``bpe`` (a byte-level BPE of ``vocab_size`` tokens learned from the training split) or
    ``hf:PATH`` (a ``tokenizer.json`` or a Hugging Face folder; ``vocab_size`` its size); see
    :mod:`transformax.train.sources`."""

    source: str = "stdlib"
    path: str = ""
    tokenizer: str = "bytes"
    dtype: str = "uint16"  # bin: token dtype
    vocab_size: int = 256  # the tokenizer's vocabulary (bytes: 256)
    seq_len: int = 256
    val_fraction: float = 0.05  # byte sources: the corpus's tail held out for evaluation
    mlm_probability: float = 0.15  # bert: share of positions masked
    # documents packed into each sequence (text sources: each file; bin: split at eos_id); no
    # token attends across a document boundary, positions restart at each, and (decoders) the
    # first token of a document is not scored as the previous one's next token
    packing: bool = False
    eos_id: int | None = None  # bin: the token id that ends each document (GPT-2's: 50256)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, all devices together
    grad_accum: int = 1  # micro-batches per step (each batch_size / grad_accum sequences)


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    decay_norms_and_biases: bool = False  # weight decay on 1-D parameters
    # never decayed: parameter roles (transformax.nn.ROLES: embedding, in_proj, out_proj,
    # weight, vector) and fnmatch patterns on parameter paths ("blocks/0/attn/qkv/w")
    no_decay: list[str] = dataclasses.field(default_factory=lambda: ["embedding"])


@dataclasses.dataclass
class EvalConfig:
    every: int = 100  # steps between evaluations; 0: only at the end
    batches: int = 8  # held-out batches per evaluation


@dataclasses.dataclass
class SampleConfig:
    every: int = 0  # steps between text samples (decoders only); 0: only at the end
    prompt: str = "def "
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    num: int = 1  # samples each time; 0: no samples


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # the last K checkpoints are kept


@dataclasses.dataclass
class LogConfig:
    every: int = 10  # steps between metric lines
    progress: bool = True  # tqdm progress bar
    # per device, for MFU; the default: 2 AVX-512 cores, 64 f32 FLOP/cycle each at ~3 GHz
    peak_tflops: float = 0.4
    profile: str = ""  # "START:STOP": a jax.profiler trace of those steps in the run's profile/
    tensorboard: bool = False  # also write the metrics as TensorBoard events in tensorboard/


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axes; one may be -1 (fills the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class DistConfig:
    """Several processes (``jax.distributed``). Unset values come from ``JAX_COORDINATOR_ADDRESS``
    / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` where set; with neither, one process."""

    coordinator: str = ""  # HOST:PORT of process 0's coordination service
    num_processes: int = 0  # 0: from the environment
    process_id: int = -1  # -1: from the environment
    timeout_s: int = 60  # start-up wait for every process, and a lost peer's heartbeat timeout


@dataclasses.dataclass
class RunConfig:
    """Everything a training run needs; the run folder is ``out_dir/name``."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    model: Any = None  # the arch's model section, see model_schema()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)

    @property
    def task(self):
        return TASKS[self.model.arch]

    @property
    def model_config(self):
        """The model's own ``Config`` built from the ``model`` section."""
        fields = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)
                  if f.name not in ("arch", "init_from")}
        try:
            return self.task.module.Config(**fields)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None


@functools.cache
def model_schema(arch: str) -> type:
    """A dataclass with ``arch``, ``init_from`` (``hf:PATH`` / ``run:PATH``: start from those
    weights, see :mod:`transformax.train.sources`) and every field of
    ``transformax.models.<arch>.Config``."""
    if arch not in TASKS:
        raise ConfigError(f"model.arch={arch!r}: expected one of {sorted(TASKS)}")
    cls = TASKS[arch].module.Config
    hints = typing.get_type_hints(cls)
    fields = [("arch", str, dataclasses.field(default=arch)),
              ("init_from", str, dataclasses.field(default=""))]
    for f in dataclasses.fields(cls):
        default = (dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
                   else dataclasses.field(default_factory=f.default_factory))
        fields.append((f.name, hints[f.name], default))
    return dataclasses.make_dataclass(f"{arch.capitalize()}ModelConfig", fields)


def load(path: str | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """The schema's defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides,
    checked by :func:`validate` (except the checks that need the device count)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
    layers = [] if path is None else [_read_yaml(path)]
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except (yaml.YAMLError, oc_errors.OmegaConfBaseException) as e:
        raise ConfigError(f"overrides {list(overrides)}: {e}") from None
    init_from = ""
    for layer in layers:
        init_from = OmegaConf.select(layer, "model.init_from", default=init_from)
    if init_from and not _complete_model(layers):  # the source's config, under the layers
        from transformax.train.sources import model_fields

        layers.insert(0, OmegaConf.create({"model": model_fields(init_from)}))
    arch = "gpt"
    for layer in layers:
        arch = OmegaConf.select(layer, "model.arch", default=arch)
    schema = OmegaConf.structured(RunConfig)
    schema.model = OmegaConf.structured(model_schema(arch))
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except oc_errors.ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(schema, e.full_key)) from None
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key}: {e.msg}") from None
    validate(cfg)
    return cfg


def _complete_model(layers) -> bool:
    """Whether ``layers`` set every ``model`` field (a run's resolved ``config.yaml``)."""
    given = {}
    for layer in layers:
        model = OmegaConf.select(layer, "model")
        given.update(OmegaConf.to_container(model) if OmegaConf.is_dict(model) else {})
    return "arch" in given and all(f.name in given
                                   for f in dataclasses.fields(model_schema(given["arch"])))


def _read_yaml(path: str):
    """The mapping in the YAML file ``path``; anything else (missing, unreadable, a syntax error,
    empty, not a mapping) raises :class:`ConfigError`."""
    try:
        layer = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r}: not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path!r}: YAML syntax error{where}: {problem}") from None
    if not OmegaConf.is_dict(layer) or not layer:
        what = "empty" if OmegaConf.is_dict(layer) else f"a {type(layer).__name__}"
        raise ConfigError(f"config file {path!r} is {what}: expected a mapping of sections "
                          f"(model:, data:, train:, ...)")
    return layer


def to_yaml(cfg: RunConfig) -> str:
    """``cfg`` as YAML that :func:`load` reads back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _unknown_key_message(schema, full_key: str) -> str:
    parent, _, key = full_key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    allowed = ", ".join(node.keys()) if OmegaConf.is_dict(node) else "none"
    where = f"'{parent}'" if parent else "the top level"
    return f"{full_key}: unknown key {key!r}; allowed keys under {where}: {allowed}"


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def validate(cfg: RunConfig, n_devices: int | None = None) -> None:
    """Impossible values raise :class:`ConfigError`; with ``n_devices``, also the mesh and the
    batch's divisibility over it."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value = getattr(values, f.name)
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"{section.name}.{f.name}", value, "expected a finite number")
    _check(d.source in DATA_SOURCES, "data.source", d.source, f"expected one of {DATA_SOURCES}")
    _check(d.source == "stdlib" or d.path != "", "data.path", d.path,
           f"data.source={d.source!r} needs a path")
    _check(d.dtype in BIN_DTYPES, "data.dtype", d.dtype, f"expected one of {BIN_DTYPES}")
    _check(d.tokenizer in ("bytes", "bpe") or (d.tokenizer.startswith("hf:") and
                                               len(d.tokenizer) > 3),
           "data.tokenizer", d.tokenizer, "expected bytes, bpe or hf:PATH")
    _check(d.source == "bin" or d.tokenizer != "bytes" or d.vocab_size == 256, "data.vocab_size",
           d.vocab_size, "data.tokenizer=bytes has 256 symbols")
    _check(d.tokenizer != "bpe" or d.source != "bin", "data.tokenizer", d.tokenizer,
           "bpe is learned from text: data.source must be stdlib or text")
    _check(d.tokenizer != "bpe" or d.vocab_size >= 257, "data.vocab_size", d.vocab_size,
           "data.tokenizer=bpe needs >= 257 (256 bytes and <|endoftext|>)")
    _check(d.seq_len >= 1, "data.seq_len", d.seq_len, "expected >= 1")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "expected in (0, 1)")
    _check(0.0 < d.mlm_probability < 1.0, "data.mlm_probability", d.mlm_probability,
           "expected in (0, 1)")
    _check(d.eos_id is None or d.source == "bin", "data.eos_id", d.eos_id,
           "only for data.source=bin (stdlib and text sources: each file is a document)")
    _check(d.eos_id is None or 0 <= d.eos_id < d.vocab_size, "data.eos_id", d.eos_id,
           f"expected a token id in [0, data.vocab_size={d.vocab_size})")
    _check(not d.packing or d.source != "bin" or d.eos_id is not None, "data.packing",
           d.packing, "needs document boundaries, and a .bin token stream has none of its "
           "own: set data.eos_id to the token id that ends each document (nanoGPT's GPT-2 "
           "corpora: 50256)")
    for key in ("steps", "batch_size", "grad_accum"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "expected >= 1")
    dist = cfg.dist
    _check(dist.coordinator == "" or dist.coordinator.rpartition(":")[2].isdigit(),
           "dist.coordinator", dist.coordinator, "expected HOST:PORT")
    _check(dist.num_processes >= 0, "dist.num_processes", dist.num_processes, "expected >= 1")
    _check(dist.process_id < max(dist.num_processes, 1) or dist.num_processes == 0,
           "dist.process_id", dist.process_id,
           f"expected 0 .. dist.num_processes - 1 = {dist.num_processes - 1}")
    _check(dist.timeout_s >= 1, "dist.timeout_s", dist.timeout_s, "expected >= 1")
    _check(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
           f"expected a multiple of train.grad_accum={t.grad_accum}")
    _check(o.lr > 0, "optim.lr", o.lr, "expected > 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "expected in [0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "expected >= 0")
    for key in ("b1", "b2"):
        _check(0.0 <= getattr(o, key) < 1.0, f"optim.{key}", getattr(o, key), "expected in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "expected > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "expected >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "expected >= 0 (0 disables)")
    for section, key in (("eval", "every"), ("sample", "every"), ("sample", "max_new_tokens"),
                         ("log", "every"), ("checkpoint", "every"), ("sample", "top_k"),
                         ("sample", "num")):
        value = getattr(getattr(cfg, section), key)
        _check(value >= 0, f"{section}.{key}", value, "expected >= 0")
    for section, key in (("eval", "batches"), ("checkpoint", "keep")):
        value = getattr(getattr(cfg, section), key)
        _check(value >= 1, f"{section}.{key}", value, "expected >= 1")
    _check(cfg.sample.temperature >= 0, "sample.temperature", cfg.sample.temperature,
           "expected >= 0 (0: greedy)")
    _check(cfg.log.peak_tflops > 0, "log.peak_tflops", cfg.log.peak_tflops, "expected > 0")
    try:
        profiling.parse(cfg.log.profile)
    except ValueError as e:
        raise ConfigError(f"log.profile={cfg.log.profile!r}: {e}") from None
    model_cfg = cfg.model_config
    _check(d.seq_len <= model_cfg.max_len, "data.seq_len", d.seq_len,
           f"expected <= the model's {model_cfg.max_len_field}={model_cfg.max_len} "
           f"(model.{model_cfg.max_len_field})")
    s = cfg.sample  # the prompt's length in tokens is checked once the tokenizer is known
    _check(s.max_new_tokens >= 1 or s.num == 0, "sample.max_new_tokens", s.max_new_tokens,
           "expected >= 1 (or sample.num=0: no samples)")
    needed = d.vocab_size + (1 if cfg.task.objective == "mlm" else 0)
    _check(model_cfg.vocab_size >= needed, "model.vocab_size", model_cfg.vocab_size,
           f"expected >= {needed} (data.vocab_size={d.vocab_size}"
           + (" plus a [MASK] token)" if cfg.task.objective == "mlm" else ")"))
    if n_devices is not None:
        mesh_shape(cfg.mesh, n_devices)
        shards = math.prod(mesh_shape(cfg.mesh, n_devices)[:2])
        micro = t.batch_size // t.grad_accum
        _check(micro % shards == 0, "train.batch_size", t.batch_size,
               f"batch_size / grad_accum = {micro} must be divisible by the {shards} batch "
               f"shards (mesh.data x mesh.fsdp over {n_devices} devices)")


def mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with a -1 filled so that the product is ``n_devices``."""
    sizes = [getattr(mesh, a) for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        _check(size == -1 or size >= 1, f"mesh.{axis}", size, "expected >= 1 or -1 (fill)")
    _check(sizes.count(-1) <= 1, "mesh", dict(zip(MESH_AXES, sizes)), "at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        _check(n_devices % known == 0, "mesh", dict(zip(MESH_AXES, sizes)),
               f"the fixed axes' product {known} must divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    _check(math.prod(sizes) == n_devices, "mesh", dict(zip(MESH_AXES, sizes)),
           f"the axes' product must equal the {n_devices} devices")
    return tuple(sizes)
