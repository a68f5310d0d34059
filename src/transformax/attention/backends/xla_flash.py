"""Blockwise flash attention in plain JAX (the CPU default).

Online softmax over key/value blocks with f32 statistics; memory is O(L·E): the scores exist
one ``(block_q, block_k)`` tile at a time. Tiles the mask hides completely (``blocks``) are
never computed, tiles it shows completely skip the masking work; every mask, ``score_mod`` and
its gradient (``tile_math``) run here. The backward pass recomputes the probabilities from the
saved log-sum-exp (FlashAttention-2's scheme).

Layout: the ``G`` query heads that share a key/value head are stacked along the rows of a q
block, so every matmul is a plain batched ``(B, Hk, G·block_q, E) x (B, Hk, E, block_k)``
product without repeating K/V; batch and heads stay separate dims, so a sharded ``jit``
partitions over them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from transformax import host
from transformax.attention import blocks, tile_math, tune
from transformax.attention.problem import Extras, Problem, cdiv
from transformax.attention.tile_math import Index, dropout_keep, finite_or_zero, row_delta

NAME = "xla_flash"
FEATURES = frozenset({"dense mask", "dropout", "key intervals", "segment ids", "mask_mod",
                      "score_mod"})


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of one pass: ``block_q`` query rows (per head) by ``block_k`` keys."""

    block_q: int
    block_k: int

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"xla_flash Config: block_q and block_k must be >= 1; got "
                             f"block_q={self.block_q}, block_k={self.block_k}")


def default_config(problem: Problem, pass_: str) -> Config:
    """Measured against torch's SDPA on a 2-core AVX-512 host (2 MiB L2 per core): the forward
    is fastest with 256 x 256 tiles, 128 x 128 below 512 queries (where causal skipping matters
    more) or with less than 1 MiB of L2; the backward, which keeps five tile-sized arrays live,
    with 128 x 128."""
    small = pass_ == "bwd" or problem.q_len < 512 or host.current().l2 < 2**20
    size = 128 if small else 256
    return Config(min(size, _round_up(problem.q_len, 8)), min(size, _round_up(problem.kv_len, 8)))


def candidates(problem: Problem, pass_: str) -> list[Config]:
    sizes = [n for n in (64, 128, 256, 512) if n <= _round_up(max(problem.q_len, problem.kv_len), 8)]
    return [Config(bq, bk) for bq in sizes or [8] for bk in sizes or [8]]


def _round_up(n: int, m: int) -> int:
    return cdiv(n, m) * m


def _pad(x, axis: int, size: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths) if size != x.shape[axis] else x


class _Tiling:
    """The tiling of one problem: block layout, and which key blocks each query block visits
    (FULL ones without masking, PARTIAL ones with it), merged over batch and heads."""

    def __init__(self, problem: Problem, extras: Extras, backward: bool):
        p = self.p = problem
        cfg = tune.planned(NAME, problem, "bwd" if backward else "fwd")
        self.bq = min(cfg.block_q, _round_up(problem.q_len, 8))
        self.bk = min(cfg.block_k, _round_up(problem.kv_len, 8))
        # q is scaled once up front where that costs no precision (f32/f64); else the scores.
        self.prescaled = p.dtype == p.acc_dtype
        self.nq, self.nk = cdiv(p.q_len, self.bq), cdiv(p.kv_len, self.bk)
        self.rows_per_block = p.groups * self.bq
        self.classes = blocks.union(blocks.classify(p, extras, self.bq, self.bk))

    def visits(self, transpose: bool = False):
        """Per query block (per key block with ``transpose``): the counts and index lists of
        the FULL and the PARTIAL blocks of the other kind, as int32 arrays."""
        classes = self.classes.T if transpose else self.classes
        return tuple(tuple(jnp.asarray(x) for x in blocks.lists(classes, cls))
                     for cls in (blocks.FULL, blocks.PARTIAL))

    def q_blocks(self, x):
        """``(B, Hq, L, D)`` -> ``(nq, B, Hk, G·bq, D)``."""
        p = self.p
        x = _pad(x, 2, self.nq * self.bq)
        x = x.reshape(p.batch, p.kv_heads, p.groups, self.nq, self.bq, x.shape[-1])
        return jnp.moveaxis(x, 3, 0).reshape(self.nq, p.batch, p.kv_heads, self.rows_per_block,
                                             x.shape[-1])

    def unblock(self, x, depth: int):
        """Inverse of ``q_blocks`` -> ``(B, Hq, L, depth)``."""
        p = self.p
        x = x.reshape(self.nq, p.batch, p.kv_heads, p.groups, self.bq, depth)
        x = jnp.moveaxis(x, 0, 3).reshape(p.batch, p.q_heads, self.nq * self.bq, depth)
        return x[:, :, :p.q_len]

    def kv(self, x):
        """``(B, Hk, S, D)`` padded to ``nk·bk`` keys."""
        return _pad(x, 2, self.nk * self.bk)

    def dense_mask(self, mask):
        """``(Bm, Hm, Lm, Sm)`` -> padded ``(Bm, Hk or 1, G or 1, Lm', Sm')``."""
        p = self.p
        if mask is None:
            return None
        if mask.shape[2] != 1:
            mask = _pad(mask, 2, self.nq * self.bq)
        if mask.shape[3] != 1:
            mask = _pad(mask, 3, self.nk * self.bk)
        if mask.shape[1] == 1:
            return mask[:, :, None]
        return mask.reshape(mask.shape[0], p.kv_heads, p.groups, *mask.shape[2:])

    def index(self, i, j) -> Index:
        """Positions of tile (i, j)'s ``(B, Hk, G·bq, bk)`` scores."""
        p = self.p
        row = lax.broadcasted_iota(jnp.int32, (self.rows_per_block, 1), 0)
        b = lax.broadcasted_iota(jnp.int32, (p.batch, 1, 1, 1), 0)
        h = lax.broadcasted_iota(jnp.int32, (1, p.kv_heads, 1, 1), 1) * p.groups + row // self.bq
        cols = j * self.bk + lax.broadcasted_iota(jnp.int32, (1, self.bk), 1)
        return Index(b, h, i * self.bq + row % self.bq, cols)

    def raw_scores(self, q_block, k, j):
        """``q @ k^T * scale`` of key block j, ``(B, Hk, G·bq, bk)`` in the acc dtype."""
        p = self.p
        k_tile = lax.dynamic_slice_in_dim(k, j * self.bk, self.bk, axis=2)
        s = jnp.einsum("bhqe,bhke->bhqk", q_block, k_tile, preferred_element_type=p.acc_dtype)
        return s if self.prescaled else s * jnp.asarray(p.scale, p.acc_dtype)

    def scores(self, raw, extras: Extras, mask, idx: Index, i, j, masked: bool):
        """Raw scores -> the scores the softmax sees (``-inf`` where hidden), and the dropout
        keep-mask (or None)."""
        p = self.p
        if masked:
            tile = None if mask is None else self.mask_tile(mask, i, j)
            s = tile_math.scores(p, extras, raw, idx, tile)
            if p.kv_len % self.bk:
                s = jnp.where(idx.kv < p.kv_len, s, -jnp.inf)
        else:
            s = tile_math.score_mod(p, extras, raw, idx)
        keep = None
        if p.has_dropout:
            keep = dropout_keep(extras.seed, p.dropout_p, idx.b, idx.h, p.q_heads, idx.q, idx.kv)
        return s, keep

    def mask_tile(self, mask, i, j):
        """The dense mask's tile (i, j), broadcastable to ``(B, Hk, G·bq, bk)``."""
        if mask.shape[3] != 1:
            mask = lax.dynamic_slice_in_dim(mask, i * self.bq, self.bq, axis=3)
        if mask.shape[4] != 1:
            mask = lax.dynamic_slice_in_dim(mask, j * self.bk, self.bk, axis=4)
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], self.p.groups, self.bq, mask.shape[4]))
        return mask.reshape(*mask.shape[:2], self.rows_per_block, mask.shape[4])

    def prepare(self, q, k, v, mask):
        """Blocks, pads and (for f32/f64) pre-scales the operands once for the tile loops."""
        if self.prescaled:
            q = q * jnp.asarray(self.p.scale, q.dtype)
        return self.q_blocks(q), self.kv(k), self.kv(v), self.dense_mask(mask)


def forward(problem: Problem, q, k, v, extras: Extras):
    t = _Tiling(problem, extras, backward=False)
    p = problem
    q_blocks, k, v, mask = t.prepare(q, k, v, extras.mask)
    rows_shape, acc = (p.batch, p.kv_heads, t.rows_per_block), p.acc_dtype
    (n_full, full), (n_partial, partial) = t.visits()

    def one_q_block(args):
        i, q_block = args

        def step(order, masked):
            def body(n, carry):
                row_max, total, weighted = carry
                j = order[i, n]
                idx = t.index(i, j)
                s, keep = t.scores(t.raw_scores(q_block, k, j), extras, mask, idx, i, j,
                                    masked)
                new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
                safe_max = finite_or_zero(new_max)
                correction = jnp.exp(row_max - safe_max)
                weights = jnp.exp(s - safe_max[..., None])
                total = total * correction + jnp.sum(weights, axis=-1)
                if keep is not None:
                    weights = jnp.where(keep, weights, 0.0)
                v_tile = lax.dynamic_slice_in_dim(v, j * t.bk, t.bk, axis=2)
                pv = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v_tile,
                                preferred_element_type=acc)
                return new_max, total, weighted * correction[..., None] + pv
            return body

        init = (jnp.full(rows_shape, -jnp.inf, acc), jnp.zeros(rows_shape, acc),
                jnp.zeros((*rows_shape, p.v_head_dim), acc))
        carry = lax.fori_loop(0, n_full[i], step(full, False), init)
        row_max, total, weighted = lax.fori_loop(0, n_partial[i], step(partial, True), carry)
        seen = total > 0
        safe_total = jnp.where(seen, total, 1.0)
        out = weighted / safe_total[..., None]
        if p.has_dropout:
            out = out / (1.0 - p.dropout_p)
        lse = jnp.where(seen, finite_or_zero(row_max) + jnp.log(safe_total), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = lax.map(one_q_block, (jnp.arange(t.nq), q_blocks))
    return t.unblock(out, p.v_head_dim), t.unblock(lse[..., None], 1)[..., 0]


def backward(problem: Problem, q, k, v, extras: Extras, out, lse, dout, dlse):
    t = _Tiling(problem, extras, backward=True)
    p, acc = problem, problem.acc_dtype
    delta = row_delta(out, dout, dlse)
    q_blocks, k, v, mask = t.prepare(q, k, v, extras.mask)
    dout_blocks = t.q_blocks(dout)
    lse_blocks = finite_or_zero(t.q_blocks(lse[..., None])[..., 0])  # hidden rows: p = 0
    delta_blocks = t.q_blocks(delta[..., None])[..., 0]
    (n_full, full), (n_partial, partial) = t.visits(transpose=True)
    consts = tile_math.differentiable_consts(p, extras)

    def one_k_block(carry, j):
        dq, dconsts = carry
        k_tile = lax.dynamic_slice_in_dim(k, j * t.bk, t.bk, axis=2)
        v_tile = lax.dynamic_slice_in_dim(v, j * t.bk, t.bk, axis=2)

        def step(order, masked):
            def body(n, carry):
                dq, dk, dv, dconsts = carry
                i = order[j, n]
                q_block, do_block = q_blocks[i], dout_blocks[i]
                idx = t.index(i, j)
                raw = t.raw_scores(q_block, k, j)
                s, keep = t.scores(raw, extras, mask, idx, i, j, masked)
                probs = jnp.exp(s - lse_blocks[i][..., None])
                dp = jnp.einsum("bhqd,bhkd->bhqk", do_block, v_tile,
                                preferred_element_type=acc)
                dropped = probs
                if keep is not None:
                    inv_keep = 1.0 / (1.0 - p.dropout_p)
                    dropped = jnp.where(keep, probs * inv_keep, 0.0)
                    dp = jnp.where(keep, dp * inv_keep, 0.0)
                dv = dv + jnp.einsum("bhqk,bhqd->bhkd", dropped.astype(do_block.dtype), do_block,
                                     preferred_element_type=acc)
                ds, dtile = tile_math.score_mod_vjp(p, extras, raw, idx,
                                                    probs * (dp - delta_blocks[i][..., None]))
                dconsts = tuple(a + b for a, b in zip(dconsts, dtile))
                ds = ds.astype(q_block.dtype)
                dk = dk + jnp.einsum("bhqk,bhqe->bhke", ds, q_block,
                                     preferred_element_type=acc)
                dq = dq.at[i].add(jnp.einsum("bhqk,bhke->bhqe", ds, k_tile,
                                             preferred_element_type=acc))
                return dq, dk, dv, dconsts
            return body

        init = (dq, jnp.zeros(k_tile.shape, acc), jnp.zeros(v_tile.shape, acc), dconsts)
        carry = lax.fori_loop(0, n_partial[j], step(partial, True), init)
        dq, dk, dv, dconsts = lax.fori_loop(0, n_full[j], step(full, False), carry)
        return (dq, dconsts), (dk, dv)

    dq0 = jnp.zeros((*q_blocks.shape[:-1], p.head_dim), acc)
    dconsts0 = tuple(jnp.zeros(c.shape, acc) for c in consts)
    (dq, dconsts), (dk, dv) = lax.scan(one_k_block, (dq0, dconsts0), jnp.arange(t.nk))
    # ds is the gradient of the scaled scores.
    dq = t.unblock(dq, p.head_dim) * jnp.asarray(p.scale, acc)
    if not t.prescaled:
        dk = dk * jnp.asarray(p.scale, acc)

    def unblock_kv(x):
        x = jnp.moveaxis(x, 0, 2).reshape(p.batch, p.kv_heads, t.nk * t.bk, x.shape[-1])
        return x[:, :, :p.kv_len]

    return (dq.astype(q.dtype), unblock_kv(dk).astype(k.dtype), unblock_kv(dv).astype(v.dtype),
            tuple(d.astype(c.dtype) for d, c in zip(dconsts, consts)))
