"""Custom-call kernels under automatic shardings: what the attention op and the native int8
matmul share. A kernel behind XLA's FFI (or a Pallas call) is opaque to XLA's partitioner, which
would gather its operands to every device; a partitioning rule (``custom_partitioning`` with a
Shardy sharding rule) runs it on each device's shard instead. jax lowers such a rule only with
the device list, so it is used only where ``left_to_partitioner`` says a ``jit`` has devices to
split over."""

from __future__ import annotations

import math

import jax
# The context meshes a trace runs under, and a partitioner's sharding read as mesh axes: jax has
# no public API for either.
from jax._src import mesh as mesh_lib, sharding_impls
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def axes(entry) -> tuple[str, ...]:
    """The mesh axis names of one ``PartitionSpec`` entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def size(mesh, entry) -> int:
    """How many ways ``entry`` (a ``PartitionSpec`` entry) splits a dim over ``mesh``."""
    return math.prod(mesh.shape[a] for a in axes(entry))


def spec(mesh, shape) -> tuple:
    """How the partitioner splits ``shape`` (a ``jax.ShapeDtypeStruct`` it gave a partitioning
    rule), as mesh axes per dim; whole (None) where it splits a dim otherwise than over whole
    mesh axes (part of an axis: the rule then has it gathered)."""
    ndim = len(shape.shape)
    try:
        entries = tuple(sharding_impls.parse_flatten_op_sharding(
            shape.sharding._to_xla_hlo_sharding(ndim), mesh)[0])
    except ValueError:
        entries = ()
    return entries + (None,) * (ndim - len(entries))


def of_devices(mesh) -> bool:
    """Whether ``mesh`` (concrete, or the abstract one of a traced array) is made of this
    process's devices: jax lowers a partitioning rule only with devices, not for an
    ``AbstractMesh`` made by hand (e.g. to export for other hardware)."""
    device = mesh.abstract_mesh.abstract_device
    return device is not None and device.platform == jax.devices()[0].platform


def left_to_partitioner(*arrays) -> bool:
    """Whether a ``jit`` may leave an op on ``arrays`` to XLA's partitioner over devices: an
    array, or the context (``jax.set_mesh``), on a mesh of this process's devices with several
    of them over axes not manual; not in a lowering for an abstract mesh alone."""
    context = mesh_lib.get_concrete_mesh()
    if context.empty and not mesh_lib.get_abstract_mesh().empty:
        return False
    meshes = [jax.typeof(x).sharding.mesh for x in arrays] + [context.abstract_mesh]
    return any(of_devices(mesh) and math.prod(
        n for n, t in zip(mesh.axis_sizes, mesh.axis_types)
        if t != jax.sharding.AxisType.Manual) > 1 for mesh in meshes)


def whole_problem(fn):
    """``fn`` as a ``custom_partitioning`` body: run in a ``jit`` (which keeps the constants a
    kernel's trace makes inside it; the op takes none)."""
    return custom_partitioning(lambda *args: jax.jit(fn)(*args))


def factorwise(fn, operands: tuple[str, ...], result: str, reduce: str = "", whole: str = ""):
    """``fn(*arrays) -> array`` with a partitioning rule, for a local computation whose result
    element depends only on the operand elements of the same factors (one letter per dim, e.g.
    ``("mk", "kn"), "mn"`` for a matmul), summed over the ``reduce`` factors. Each device runs
    ``fn`` on its shard, split as the operands come (each factor over the axes of the first
    operand splitting it evenly; ``whole`` factors never split), and sums a split ``reduce``
    factor's partial results."""
    op = whole_problem(fn)

    def partition(mesh, arg_shapes, result_shape):
        split, used = {}, set()
        for factors, x in zip(operands, arg_shapes):
            for factor, dim, entry in zip(factors, x.shape, spec(mesh, x)):
                names = set(axes(entry))
                if (names and factor not in split and factor not in whole
                        and not names & used and not dim % size(mesh, entry)):
                    split[factor], used = entry, used | names
        summed = tuple(a for f in reduce if f in split for a in axes(split[f]))

        def lower(*args):
            out = fn(*args)
            return jax.lax.psum(out, summed) if summed else out

        shard = lambda factors: NamedSharding(mesh, P(*(split.get(f) for f in factors)))
        return mesh, lower, shard(result), tuple(map(shard, operands))

    order = dict.fromkeys("".join(operands) + result)  # special factors in the rule's order
    op.def_partition(partition, decode_shardings=False,
                     sharding_rule=", ".join(map(" ".join, operands)) + " -> "
                     + " ".join(result), reduction_factors=tuple(f for f in order if f in reduce),
                     need_replication_factors=tuple(f for f in order if f in whole))
    return op
