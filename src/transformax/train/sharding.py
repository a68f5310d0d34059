"""Scaling out: several processes, a device mesh, and where params, optimizer state and batches
live.

Mesh axes ``data``, ``fsdp``, ``tensor``. Batches are split over ``data`` x ``fsdp``; every
parameter (and its optimizer moments) of two or more dimensions is split FSDP-style over
``fsdp`` along its largest divisible dimension; with ``tensor > 1``, in-projections are split by
output column and out-projections by input row over ``tensor``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transformax.nn import roles
from transformax.train.config import MESH_AXES, DistConfig, MeshConfig, mesh_shape
from transformax.train.optim import param_path

BATCH_AXES = ("data", "fsdp")
TENSOR_DIM = {roles.IN_PROJ: -1, roles.OUT_PROJ: 0}  # by role (transformax.nn.param_role)


def initialize_distributed(cfg: DistConfig) -> bool:
    """``jax.distributed.initialize`` (with CPU collectives) when ``cfg`` or the environment
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; SLURM / Open MPI)
    describes several processes. A process that does not start, or stops, within
    ``cfg.timeout_s`` makes the others fail with jax's error instead of waiting forever."""
    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = cfg.num_processes or _env_int("JAX_NUM_PROCESSES", 0)
    process_id = cfg.process_id if cfg.process_id >= 0 else _env_int("JAX_PROCESS_ID", -1)
    several = (coordinator != "" or num_processes > 1 or _env_int("SLURM_NTASKS", 1) > 1
               or _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1)
    if several and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator or None, num_processes or None, None if process_id < 0 else process_id,
            initialization_timeout=cfg.timeout_s, heartbeat_timeout_seconds=cfg.timeout_s)
    return several


class PeerLost(RuntimeError):
    """A collective of a multi-process run failed: another process stopped or its connection
    broke. jax's exit-time shutdown would wait for that process, then abort the interpreter, so
    a command reports this and exits at once (``exit_at_once``)."""

    exit_at_once = True


def peer_lost(error: Exception) -> PeerLost | None:
    """``error`` as :class:`PeerLost` where it is a runtime error of a multi-process run (a
    collective or the coordination service failing); else None."""
    if not isinstance(error, jax.errors.JaxRuntimeError) or jax.process_count() == 1:
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return PeerLost(f"process {jax.process_index()} of {jax.process_count()} lost contact with "
                    f"another process (it stopped, or its connection broke): {first}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches ``(micro_batches, batch, seq)``: the batch axis over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Where one parameter (or optimizer moment) of ``shape`` at ``path`` lives."""
    spec: list = [None] * len(shape)
    if len(shape) < 2:
        return P()
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    dim = TENSOR_DIM.get(roles.param_role(path, len(shape)))
    if tensor > 1 and dim is not None and shape[dim] % tensor == 0:
        spec[dim] = "tensor"
    if fsdp > 1:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """A ``NamedSharding`` per leaf of a params / optimizer-state / train-state pytree; leaves
    whose path ends like a parameter's get that parameter's placement."""
    def one(path, x):
        return NamedSharding(mesh, param_spec(param_path(path), tuple(x.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)
