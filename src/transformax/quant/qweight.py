"""The quantized weight: a pytree node holding int8 values and their scales, used in place of an
``nn.linear`` weight (``x @ qw`` runs the selected int8 kernel)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INT8_MAX = 127
INT4_MAX = 7


def pack_int4(q: jax.Array) -> jax.Array:
    """``(K, N)`` int8 values in [-8, 7] as ``(K / 2, N)`` int8 bytes: row ``2i`` in the low
    nibble, row ``2i + 1`` in the high one."""
    pairs = q.reshape(*q.shape[:-2], q.shape[-2] // 2, 2, q.shape[-1])
    return (pairs[..., 0, :] & 0x0F) | (pairs[..., 1, :] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """The inverse of :func:`pack_int4`: sign-extended nibbles, ``(K, N)`` int8."""
    low = (packed << 4) >> 4  # arithmetic shifts sign-extend
    pairs = jnp.stack([low, packed >> 4], axis=-2)
    return pairs.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1])


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An ``(in, out)`` weight as ``values`` (int8) times ``scale``: ``(groups, out)`` for per
    channel (groups = 1) and grouped weights, ``(1, 1)`` per tensor. Static activation
    quantization adds ``act_scale`` (and ``act_zero`` when asymmetric), scalars. ``bits=4``:
    two values per byte of ``values`` (:func:`pack_int4`), ``(in / 2, out)``. The metadata
    (``name``: the layer path; the activation mode; the original ``dtype``; ``bits``) is
    static."""

    values: jax.Array
    scale: jax.Array
    act_scale: jax.Array | None = None
    act_zero: jax.Array | None = None
    name: str = "linear"
    activations: str = "none"
    act_granularity: str = "token"
    act_symmetric: bool = True
    dtype: str = "float32"
    bits: int = 8

    __array_ufunc__ = None  # NumPy arrays defer ``x @ qw`` to ``__rmatmul__``

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, k, n = self.values.shape
        return (*lead, k * (8 // self.bits), n)

    def int8_values(self) -> jax.Array:
        """The ``(in, out)`` integer values as int8 (unpacked when ``bits=4``)."""
        return unpack_int4(self.values) if self.bits == 4 else self.values

    @property
    def groups(self) -> int:
        return self.scale.shape[-2]

    @property
    def granularity(self) -> str:
        if self.scale.shape[-1] == 1 and self.values.shape[-1] != 1:
            return "tensor"
        return "group" if self.groups > 1 else "channel"

    def dequantize(self) -> jax.Array:
        """The float ``(in, out)`` weight these values and scales stand for."""
        q = self.int8_values()
        k, n = q.shape[-2:]
        g = self.groups
        w = q.reshape(*q.shape[:-2], g, k // g, n).astype(jnp.float32)
        return (w * self.scale[..., :, None, :]).reshape(q.shape).astype(self.dtype)

    def __rmatmul__(self, x):
        from transformax.quant.matmul import matmul  # matmul imports this module
        return matmul(x, self)


jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["values", "scale", "act_scale", "act_zero"],
    meta_fields=["name", "activations", "act_granularity", "act_symmetric", "dtype", "bits"])


@dataclasses.dataclass(frozen=True)
class QuantizedTable:
    """A ``(num, dim)`` embedding table, quantized per row and stored transposed, as the
    ``(dim, num)`` int8 ``values`` and ``(1, num)`` ``scale`` of its output-head weight:
    ``nn.unembed`` (``x @ table.T``, a tied head) multiplies by ``.T``, a
    :class:`QuantizedWeight` (no copy), and ``nn.embed`` looks rows up (columns of ``values``)."""

    values: jax.Array
    scale: jax.Array
    name: str = "embedding"
    activations: str = "none"
    act_granularity: str = "token"
    act_symmetric: bool = True
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[::-1]

    @property
    def T(self) -> QuantizedWeight:  # noqa: N802 (the array attribute it stands in for)
        return QuantizedWeight(self.values, self.scale, name=self.name,
                               activations=self.activations,
                               act_granularity=self.act_granularity,
                               act_symmetric=self.act_symmetric, dtype=self.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Dequantized rows ``ids.shape + (dim,)``."""
        rows = jnp.moveaxis(jnp.take(self.values, ids, axis=1), 0, -1).astype(jnp.float32)
        return (rows * jnp.take(self.scale[0], ids)[..., None]).astype(self.dtype)

    def dequantize(self) -> jax.Array:
        return self.T.dequantize().T


jax.tree_util.register_dataclass(
    QuantizedTable, data_fields=["values", "scale"],
    meta_fields=["name", "activations", "act_granularity", "act_symmetric", "dtype"])


def quantize_weight(w: jax.Array, *, granularity: str, group_size: int, name: str,
                    bits: int = 8) -> dict:
    """``values`` and ``scale`` of a float ``(in, out)`` weight: symmetric, round to nearest
    (int8: [-127, 127]; int4: [-7, 7], packed); an all-zero channel gets scale 1 (its values
    are 0)."""
    k, n = w.shape
    if granularity == "group" and k % group_size:
        raise ValueError(f"quantize: layer {name!r}: group_size={group_size} does not divide "
                         f"its {k} input features (weight shape {w.shape})")
    if bits == 4 and k % 2:
        raise ValueError(f"quantize: layer {name!r}: int4 packs two input rows per byte, so "
                         f"it needs an even number of input features (weight shape {w.shape})")
    qmax = INT4_MAX if bits == 4 else INT8_MAX
    groups = k // group_size if granularity == "group" else 1
    wg = w.astype(jnp.float32).reshape(groups, k // groups, n)
    axes = (1, 2) if granularity == "tensor" else (1,)
    amax = jnp.max(jnp.abs(wg), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    values = jnp.clip(jnp.round(wg / scale), -qmax, qmax).astype(jnp.int8).reshape(k, n)
    return {"values": pack_int4(values) if bits == 4 else values, "scale": scale[:, 0, :]}
