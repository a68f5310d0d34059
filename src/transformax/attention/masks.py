"""Structured attention masks: which keys each query may attend to, described compactly so that
kernels compute them tile by tile (and skip the tiles they hide) instead of reading an ``(L, S)``
array.

Every mask is a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend, torch
FlexAttention's convention) and combines with ``&`` and ``|``. Kernels see a mask in a normal
form (``Structure``): a per-row key interval ``[lo, hi)`` (bands: causal, sliding window,
prefix-LM, chunks, per-row cache offsets), equal segment ids (documents, key padding), and a
generic remainder evaluated elementwise from its ``mask_mod``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformax.attention import blocks
from transformax.attention.problem import hoist


def _is_static(x) -> bool:
    return isinstance(x, (int, np.integer)) or x is None


class Mask:
    """Base class: ``q_len``/``kv_len`` (None where the mask fits any length) and
    ``mask_mod``."""

    q_len: int | None
    kv_len: int | None

    def mask_mod(self, b, h, q_idx, kv_idx):
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        return And(_check_mask(self), _check_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(_check_mask(self), _check_mask(other))

    def bounds(self, batch: int):
        """The visible keys of every row as ``[lo, hi)``: int32 ``(Bm, L)`` arrays with ``Bm``
        1 or ``batch``, or None where the mask is not an interval per row."""
        return None

    def segments(self):
        """``(q_ids (Bm, L or 1), kv_ids (Bm, S))``: a query sees the keys with its id; or None."""
        return None

    @property
    def batch_size(self) -> int | None:
        """The batch the mask's arrays are for (None: the same for every batch element)."""
        return None

    def to_dense(self) -> jax.Array:
        """The mask as a bool array: ``(L, S)``, or ``(B, 1, L, S)`` where it depends on the
        batch element (L is 1 for a mask that is the same for every query)."""
        batch = self.batch_size
        dense = blocks.evaluate(self.mask_mod, 1 if batch is None else batch, 1,
                                1 if self.q_len is None else self.q_len, self.kv_len)
        return dense[0, 0] if batch is None else dense


def _pytree(cls):
    """Registers a mask dataclass as a pytree whose leaves are its array fields (and the leaves
    of its mask fields); Python ints and functions stay static, so masks cross ``jit`` and
    ``eval_shape`` boundaries keeping their static fast paths."""
    names = [f.name for f in dataclasses.fields(cls)]

    def flatten(mask):
        values = [getattr(mask, n) for n in names]
        dynamic = tuple(not (_is_static(v) or callable(v) and not isinstance(v, Mask)
                             or isinstance(v, tuple)) for v in values)
        children = [v for v, d in zip(values, dynamic) if d]
        static = tuple(None if d else v for v, d in zip(values, dynamic))
        return children, (dynamic, static)

    def unflatten(aux, children):
        dynamic, static = aux
        it = iter(children)
        return cls(*(next(it) if d else v for d, v in zip(dynamic, static)))

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls


def _check_mask(x) -> Mask:
    if not isinstance(x, Mask):
        raise TypeError(f"masks combine only with masks (tfx.causal_upper_left, tfx.band, "
                        f"tfx.document_mask, tfx.create_block_mask, ...); got {type(x).__name__}")
    return x


def _length(a: int | None, b: int | None, what: str) -> int | None:
    if a is not None and b is not None and a != b:
        raise ValueError(f"masks combined with & or | disagree on {what}: {a} vs {b}")
    return a if a is not None else b


def _per_batch(x, name: str):
    """A static int, or an int32 ``(B,)`` array."""
    if _is_static(x):
        return x
    x = jnp.asarray(x)
    if x.ndim > 1 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} (shape {tuple(x.shape)}, dtype {x.dtype}) must be an int or "
                         f"an integer (B,) array")
    return x.astype(jnp.int32)


def _at(value, b):
    """A static int, or a per-batch array's entry for batch row ``b``."""
    return value if _is_static(value) or jnp.ndim(value) == 0 else value[b]


def _rows(value, batch: int):
    """A static int or ``(B,)`` array as an int32 ``(Bm, 1)`` column."""
    if _is_static(value):
        return jnp.full((1, 1), value, jnp.int32)
    value = jnp.reshape(value, (-1, 1))
    if value.shape[0] not in (1, batch):
        raise ValueError(f"a mask's per-batch values have {value.shape[0]} rows but the batch "
                         f"is {batch}")
    return value


def _batch_of(*values) -> int | None:
    sizes = {int(np.shape(v)[0]) for v in values if not _is_static(v) and np.ndim(v) >= 1}
    sizes.discard(1)
    return sizes.pop() if sizes else None


@_pytree
@dataclasses.dataclass(frozen=True)
class Band(Mask):
    """Key ``j`` is visible from query ``i`` iff ``i + offset - left <= j <= i + offset + right``
    (``left``/``right`` None: unbounded). ``offset`` may be a ``(B,)`` array: each batch row's
    position, as when decoding with a KV cache."""

    offset: Any
    q_len: int | None = None
    kv_len: int | None = None
    left: int | None = None
    right: int | None = 0

    @property
    def is_causal(self) -> bool:
        """A causal mask with a static offset: the kernels' fastest path."""
        return self.left is None and self.right == 0 and _is_static(self.offset)

    @property
    def batch_size(self):
        return _batch_of(self.offset)

    def mask_mod(self, b, h, q_idx, kv_idx):
        diag = q_idx + _at(self.offset, b)
        visible = jnp.ones(jnp.shape(kv_idx), bool)
        if self.left is not None:
            visible = visible & (kv_idx >= diag - self.left)
        if self.right is not None:
            visible = visible & (kv_idx <= diag + self.right)
        return visible

    def bounds(self, batch):
        diag = _rows(self.offset, batch) + jnp.arange(self.q_len, dtype=jnp.int32)
        lo = jnp.zeros_like(diag) if self.left is None else diag - self.left
        hi = jnp.full_like(diag, self.kv_len) if self.right is None else diag + self.right + 1
        return lo, hi


@_pytree
@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
    """Causal, and every query sees the first ``prefix`` keys (an int or a ``(B,)`` array)."""

    prefix: Any
    q_len: int
    kv_len: int

    @property
    def batch_size(self):
        return _batch_of(self.prefix)

    def mask_mod(self, b, h, q_idx, kv_idx):
        prefix = _at(self.prefix, b)
        return (kv_idx <= q_idx) | (kv_idx < prefix)

    def bounds(self, batch):
        rows = jnp.arange(self.q_len, dtype=jnp.int32)
        hi = jnp.maximum(rows + 1, _rows(self.prefix, batch))
        return jnp.zeros_like(hi), hi


@_pytree
@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
    """Queries see the keys of their own chunk of ``chunk`` positions (local attention)."""

    q_len: int
    kv_len: int
    chunk: int

    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx // self.chunk == kv_idx // self.chunk

    def bounds(self, batch):
        lo = (jnp.arange(self.q_len, dtype=jnp.int32) // self.chunk * self.chunk)[None]
        return lo, lo + self.chunk


@_pytree
@dataclasses.dataclass(frozen=True)
class Documents(Mask):
    """A query sees the keys with its segment id: packed documents, or key padding."""

    q_ids: jax.Array  # (B, L), or (B, 1): the same id for every query
    kv_ids: jax.Array  # (B, S)
    q_len: int | None = None
    kv_len: int | None = None

    @property
    def batch_size(self):
        return _batch_of(self.q_ids, self.kv_ids)

    def mask_mod(self, b, h, q_idx, kv_idx):
        q_ids = self.q_ids[b]
        return q_ids[jnp.minimum(q_idx, q_ids.shape[0] - 1)] == self.kv_ids[b, kv_idx]

    def segments(self):
        return self.q_ids, self.kv_ids


@_pytree
@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Visible where both masks allow it."""

    a: Mask
    b: Mask

    @property
    def q_len(self):
        return _length(self.a.q_len, self.b.q_len, "the query length L")

    @property
    def kv_len(self):
        return _length(self.a.kv_len, self.b.kv_len, "the key length S")

    @property
    def batch_size(self):
        return _length(self.a.batch_size, self.b.batch_size, "the batch size")

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.a.mask_mod(b, h, q_idx, kv_idx) & self.b.mask_mod(b, h, q_idx, kv_idx)


@_pytree
@dataclasses.dataclass(frozen=True)
class Or(And):
    """Visible where either mask allows it."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.a.mask_mod(b, h, q_idx, kv_idx) | self.b.mask_mod(b, h, q_idx, kv_idx)


@_pytree
@dataclasses.dataclass(frozen=True)
class MaskMod(Mask):
    """A user's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (torch FlexAttention's), for
    ``(L, S)``; it may index arrays it captures."""

    fn: Any
    q_len: int
    kv_len: int

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)


@_pytree
@dataclasses.dataclass(frozen=True)
class BlockMask(Mask):
    """``create_block_mask``'s result: a mask and the class (empty / partial / full) of each of
    its ``block_size`` tiles, so kernels skip the empty tiles and do no masking in full ones;
    and each row's hull ``[lo, hi)`` (its first visible key to its last, over all heads), with
    ``exact`` True where every row sees exactly its hull (documents, windows, causal): a call
    then runs on the hull's key intervals alone, never evaluating the mask_mod again."""

    mask: Mask
    table: jax.Array  # int8 (B or 1, H or 1, nq, nk)
    block_size: tuple[int, int]
    lo: jax.Array | None = None  # int32 (B or 1, L)
    hi: jax.Array | None = None
    exact: jax.Array | None = None  # bool scalar

    @property
    def q_len(self):
        return self.mask.q_len

    @property
    def kv_len(self):
        return self.mask.kv_len

    @property
    def batch_size(self):
        return _length(self.mask.batch_size, _batch_of(self.table), "the batch size")

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.mask.mask_mod(b, h, q_idx, kv_idx)


def create_block_mask(mask_mod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      device=None, BLOCK_SIZE: int | tuple[int, int] = 128) -> BlockMask:
    """torch's ``create_block_mask``: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over
    ``(B, H, Q_LEN, KV_LEN)`` (B or H None: the same for all) with the class of each
    ``BLOCK_SIZE`` tile and each row's hull computed now (under ``jit`` too: the mask may depend
    on traced arrays), once for every call given the result. ``device`` is accepted for torch
    compatibility and ignored."""
    del device
    if not callable(mask_mod):
        raise TypeError(f"create_block_mask: mask_mod must be a function (b, h, q_idx, kv_idx) "
                        f"-> bool; got {type(mask_mod).__name__}")
    block_q, block_k = (BLOCK_SIZE, BLOCK_SIZE) if _is_static(BLOCK_SIZE) else BLOCK_SIZE
    for name, value in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN), ("BLOCK_SIZE", block_q),
                        ("BLOCK_SIZE", block_k)):
        if not _is_static(value) or value is None or value < 1:
            raise ValueError(f"create_block_mask: {name} must be an int >= 1; got {value!r}")
    for name, value in (("B", B), ("H", H)):
        if value is not None and (not _is_static(value) or value < 1):
            raise ValueError(f"create_block_mask: {name} must be None or an int >= 1; got "
                             f"{value!r}")
    mask = MaskMod(mask_mod, int(Q_LEN), int(KV_LEN))
    fn, consts = hoist(mask_mod, "mask_mod", *[jnp.int32] * 4)
    table, lo, hi, exact = _analysed(fn, consts, B or 1, H or 1, mask.q_len, mask.kv_len,
                                     int(block_q), int(block_k))
    return BlockMask(mask, table, (int(block_q), int(block_k)), lo, hi, exact)


def _analysed(fn, consts, *sizes):
    """``_analyse``; for a mask_mod capturing no arrays (a function of the indices alone)
    computed when first traced, also under ``jit``, and kept per computation and shape: its
    calls then know their tiles and whether the hull is exact without running anything."""
    return _analyse(fn, *sizes, consts) if consts else _static_analysis(fn, *sizes)


@functools.lru_cache(maxsize=64)
def _static_analysis(fn, *sizes):
    with jax.ensure_compile_time_eval():
        return _analyse(fn, *sizes, ())


@functools.partial(jax.jit, static_argnums=range(7))
def _analyse(fn, batch: int, heads: int, q_len: int, kv_len: int, block_q: int, block_k: int,
             consts):
    """``blocks.table`` of a hoisted mask_mod, compiled once per computation (not per function
    object: a mask_mod written again for every call reuses it)."""
    return blocks.table(lambda b, h, q, kv: fn(b, h, q, kv, *consts), batch, heads, q_len,
                        kv_len, block_q, block_k)


def conjuncts(mask: Mask) -> list[Mask]:
    """``mask`` as the masks its ``&`` combines."""
    if type(mask) is And:
        return conjuncts(mask.a) + conjuncts(mask.b)
    return [mask]


@dataclasses.dataclass(frozen=True)
class Structure:
    """A mask in the kernels' normal form: the conjunction of a static causal offset, a per-row
    key interval, segment ids and a generic ``mask_mod`` (each None where absent)."""

    causal_offset: int | None = None
    bounds: tuple | None = None  # (lo, hi): int32 (Bm, L)
    segments: tuple | None = None  # (q_ids (Bm, L), kv_ids (Bm, S)): int32
    generic: Mask | None = None
    table: tuple | None = None  # (classes (Bm, Hm, nq, nk), (block_q, block_k)) of generic
    # A bool scalar where ``generic`` comes from block masks with row hulls (all in ``bounds``):
    # True where the hulls are exact, so ``bounds`` alone is the mask.
    hull_exact: jax.Array | bool | None = None


_AUTO_BLOCK = 128  # the tiles of a generic mask analysed without create_block_mask (torch's)


def structure(mask: Mask, batch: int, heads: int, q_len: int, kv_len: int) -> Structure:
    """The normal form of ``mask`` for a call of ``batch`` x ``heads`` x ``(q_len, kv_len)``.
    A generic part given without ``create_block_mask`` gets its analysis here (once per call,
    shared by the forward and backward passes; kept across calls where it captures no arrays),
    so kernels skip its hidden tiles and an exact hull replaces it by key intervals."""
    parts = conjuncts(mask)
    if len(parts) == 1 and isinstance(mask, Band) and mask.is_causal:
        return Structure(causal_offset=int(mask.offset))
    bounds = segments = table = None
    generic, exact = [], []
    for part in parts:
        if isinstance(part, BlockMask):
            table = table or (part.table, part.block_size)
            if part.lo is not None:
                bounds = _intersect(bounds, (part.lo, part.hi), q_len, kv_len)
                exact.append(part.exact)
            generic.append(part.mask)
            continue
        interval = part.bounds(batch)
        ids = part.segments()
        if interval is not None:
            bounds = _intersect(bounds, interval, q_len, kv_len)
        elif ids is not None and segments is None:
            q_ids, kv_ids = (jnp.asarray(x).astype(jnp.int32) for x in ids)
            segments = (jnp.broadcast_to(q_ids, (q_ids.shape[0], q_len)), kv_ids)
        else:
            generic.append(part)
    rest = None
    for part in generic:
        rest = part if rest is None else And(rest, part)
    if table is not None and len(generic) > 1:
        # The table classifies one of several generic parts: its FULL tiles may be masked.
        table = (jnp.minimum(table[0], blocks.PARTIAL).astype(jnp.int8), table[1])
    hull_exact = None
    if exact and len(exact) == len(generic):
        hull_exact = functools.reduce(jnp.logical_and, exact)
    elif rest is not None and table is None and q_len and kv_len:
        fn, consts = hoist(rest.mask_mod, "mask_mod", *[jnp.int32] * 4)
        classes, lo, hi, hull_exact = _analysed(
            fn, consts, batch if fn.depends[0] else 1, heads if fn.depends[1] else 1, q_len,
            kv_len, _AUTO_BLOCK, _AUTO_BLOCK)
        table, bounds = (classes, (_AUTO_BLOCK,) * 2), _intersect(bounds, (lo, hi), q_len, kv_len)
    return Structure(bounds=bounds, segments=segments, generic=rest, table=table,
                     hull_exact=hull_exact)


def _intersect(bounds, interval, q_len: int, kv_len: int):
    """``bounds`` (None or int32 ``(Bm, L)`` each) intersected with ``interval`` (clipped)."""
    lo, hi = (jnp.broadcast_to(x, (x.shape[0], q_len)).astype(jnp.int32) for x in interval)
    lo, hi = jnp.clip(lo, 0, kv_len), jnp.clip(hi, 0, kv_len)
    if bounds is not None:
        lo, hi = jnp.maximum(lo, bounds[0]), jnp.minimum(hi, bounds[1])
    return lo, hi


def causal_upper_left(q_len: int, kv_len: int) -> Band:
    """Causal mask aligned top-left, the same as ``is_causal=True``: ``tril(ones(L, S))``."""
    return Band(0, int(q_len), int(kv_len))


def causal_lower_right(q_len: int, kv_len: int) -> Band:
    """Causal mask aligned bottom-right, ``tril(ones(L, S), S - L)``: for decoding with a cache."""
    return Band(int(kv_len) - int(q_len), int(q_len), int(kv_len))


CausalMask = Band  # the causal masks above are bands


def band(q_len: int, kv_len: int, left: int | None = None, right: int | None = 0,
         offset=0) -> Band:
    """Key ``j`` visible from query ``i`` iff ``i + offset - left <= j <= i + offset + right``
    (None: unbounded); ``offset`` an int or a ``(B,)`` int array (e.g. each row's cache
    position). The default is causal."""
    for name, value in (("left", left), ("right", right)):
        if value is not None and (not _is_static(value) or value < 0):
            raise ValueError(f"band: {name} must be None or an int >= 0; got {value!r}")
    return Band(_per_batch(offset, "band: offset"), int(q_len), int(kv_len),
                None if left is None else int(left), None if right is None else int(right))


def sliding_window(q_len: int, kv_len: int, window: int, *, lower_right: bool = False) -> Band:
    """Mistral's sliding window: key ``j`` visible from query ``i`` iff
    ``0 <= i + o - j < window`` with ``o = 0`` (or ``S - L`` with ``lower_right``)."""
    if not _is_static(window) or window is None or window < 1:
        raise ValueError(f"sliding_window: window must be an int >= 1; got {window!r}")
    offset = int(kv_len) - int(q_len) if lower_right else 0
    return band(q_len, kv_len, int(window) - 1, 0, offset)


def prefix_lm(q_len: int, kv_len: int, prefix) -> PrefixLM:
    """Prefix-LM: causal, plus the first ``prefix`` keys (an int or ``(B,)`` array) for all."""
    return PrefixLM(_per_batch(prefix, "prefix_lm: prefix"), int(q_len), int(kv_len))


def chunked(q_len: int, kv_len: int, chunk: int) -> Chunked:
    """Local attention within consecutive chunks of ``chunk`` positions."""
    if not _is_static(chunk) or chunk is None or chunk < 1:
        raise ValueError(f"chunked: chunk must be an int >= 1; got {chunk!r}")
    return Chunked(int(q_len), int(kv_len), int(chunk))


def _ids(x, name: str):
    x = jnp.asarray(x)
    if x.ndim != 2 or not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == bool):
        raise ValueError(f"{name} (shape {tuple(x.shape)}, dtype {x.dtype}) must be an integer "
                         f"(B, length) array")
    return x.astype(jnp.int32)


def document_mask(q_ids, kv_ids=None) -> Documents:
    """Packed documents: query ``i`` of batch row ``b`` sees key ``j`` iff
    ``q_ids[b, i] == kv_ids[b, j]`` (``kv_ids`` defaults to ``q_ids``)."""
    q_ids = _ids(q_ids, "document_mask: q_ids")
    kv_ids = q_ids if kv_ids is None else _ids(kv_ids, "document_mask: kv_ids")
    if q_ids.shape[0] != kv_ids.shape[0]:
        raise ValueError(f"document_mask: q_ids (shape {tuple(q_ids.shape)}) and kv_ids (shape "
                         f"{tuple(kv_ids.shape)}) must have the same batch size")
    return Documents(q_ids, kv_ids, q_ids.shape[1], kv_ids.shape[1])


def key_padding(valid) -> Documents:
    """Key padding: every query sees the keys where ``valid`` (bool ``(B, S)``) is True."""
    valid = jnp.asarray(valid)
    if valid.ndim != 2:
        raise ValueError(f"key_padding: valid (shape {tuple(valid.shape)}, dtype {valid.dtype}) "
                         f"must be a (B, S) array")
    kv_ids = valid.astype(bool).astype(jnp.int32)
    return Documents(jnp.ones((valid.shape[0], 1), jnp.int32), kv_ids, None, valid.shape[1])
