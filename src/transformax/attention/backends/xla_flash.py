"""Blockwise flash attention in plain JAX (the CPU default).

Online softmax over key/value blocks with f32 statistics; memory is O(L·E): the scores exist
one ``(block_q, block_k)`` tile at a time. Tiles a causal mask hides completely are never
computed, tiles it shows completely skip the masking work. The backward pass recomputes the
probabilities from the saved log-sum-exp (FlashAttention-2's scheme).

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
from transformax.attention import tune
from transformax.attention.problem import (Problem, cdiv, dropout_keep, finite_or_zero,
                                          mask_scores, row_delta)


NAME = "xla_flash"


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
    """The static tiling of one problem: block layout and which tiles need which work."""

    def __init__(self, problem: Problem, backward: bool):
        p = self.p = problem
        cfg = tune.planned(NAME, problem, "bwd" if backward else "fwd")
        self.bq = min(cfg.block_q, _round_up(problem.q_len, 8))
        self.bk = min(cfg.block_k, _round_up(problem.kv_len, 8))
        # q is scaled once up front where that costs no precision (f32/f64); else the scores.
        self.prescaled = p.dtype == p.acc_dtype
        self.nq, self.nk = cdiv(p.q_len, self.bq), cdiv(p.kv_len, self.bk)
        self.rows_per_block = p.groups * self.bq
        ragged = p.kv_len % self.bk != 0
        visible, unmasked = [], []
        for i in range(self.nq):
            row0, row1 = i * self.bq, min((i + 1) * self.bq, p.q_len)
            status = [p.tile_visibility(row0, row1, j * self.bk, min((j + 1) * self.bk, p.kv_len))
                      for j in range(self.nk)]
            visible.append(max([j + 1 for j, s in enumerate(status) if s != "none"], default=0))
            full = 0
            while (full < visible[-1] and status[full] == "full" and not p.has_mask
                   and not (ragged and full == self.nk - 1)):
                full += 1
            unmasked.append(full)
        # q block i sees key blocks [0, visible[i]); the first unmasked[i] need no masking.
        self.visible, self.unmasked = tuple(visible), tuple(unmasked)

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

    def positions(self, i, j):
        """Query and key positions of tile (i, j): ``(G·bq, 1)`` and ``(1, bk)``."""
        rows = i * self.bq + lax.broadcasted_iota(jnp.int32, (self.rows_per_block, 1), 0) % self.bq
        cols = j * self.bk + lax.broadcasted_iota(jnp.int32, (1, self.bk), 1)
        return rows, cols

    def scores(self, q_block, k, mask, seed, i, j, masked: bool):
        """Scaled scores ``(B, Hk, G·bq, bk)`` of tile (i, j) in ``acc_dtype``, ``-inf`` where hidden, and the
        dropout keep-mask (or None)."""
        p = self.p
        k_tile = lax.dynamic_slice_in_dim(k, j * self.bk, self.bk, axis=2)
        s = jnp.einsum("bhqe,bhke->bhqk", q_block, k_tile, preferred_element_type=p.acc_dtype)
        if not self.prescaled:
            s = s * jnp.asarray(p.scale, p.acc_dtype)
        rows, cols = self.positions(i, j)
        if masked:
            s = mask_scores(p, s, rows, cols, None if mask is None else self.mask_tile(mask, i, j))
            if p.kv_len % self.bk:
                s = jnp.where(cols < p.kv_len, s, -jnp.inf)
        keep = None
        if p.has_dropout:
            group = lax.broadcasted_iota(jnp.int32, (self.rows_per_block, 1), 0) // self.bq
            heads = jnp.arange(p.kv_heads)[:, None, None] * p.groups + group
            batch_head = jnp.arange(p.batch)[:, None, None, None] * p.q_heads + heads
            keep = dropout_keep(seed, p.dropout_p, batch_head, rows, cols)
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


def forward(problem: Problem, q, k, v, mask, seed):
    t = _Tiling(problem, backward=False)
    p = problem
    q_blocks, k, v, mask = t.prepare(q, k, v, mask)
    rows_shape, acc = (p.batch, p.kv_heads, t.rows_per_block), p.acc_dtype

    def one_q_block(args):
        i, q_block = args

        def step(masked):
            def body(j, carry):
                row_max, total, weighted = carry
                s, keep = t.scores(q_block, k, mask, seed, i, j, masked)
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
        unmasked, visible = jnp.array(t.unmasked)[i], jnp.array(t.visible)[i]
        carry = lax.fori_loop(0, unmasked, step(False), init)
        row_max, total, weighted = lax.fori_loop(unmasked, visible, step(True), carry)
        seen = total > 0
        safe_total = jnp.where(seen, total, 1.0)
        out = weighted / safe_total[..., None]
        if p.has_dropout:
            out = out / (1.0 - p.dropout_p)
        lse = jnp.where(seen, finite_or_zero(row_max) + jnp.log(safe_total), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = lax.map(one_q_block, (jnp.arange(t.nq), q_blocks))
    return t.unblock(out, p.v_head_dim), t.unblock(lse[..., None], 1)[..., 0]


def backward(problem: Problem, q, k, v, mask, seed, out, lse, dout, dlse):
    t = _Tiling(problem, backward=True)
    p, acc = problem, problem.acc_dtype
    delta = row_delta(out, dout, dlse)
    q_blocks, k, v, mask = t.prepare(q, k, v, mask)
    dout_blocks = t.q_blocks(dout)
    lse_blocks = finite_or_zero(t.q_blocks(lse[..., None])[..., 0])  # hidden rows: p = 0
    delta_blocks = t.q_blocks(delta[..., None])[..., 0]
    # Key block j is seen by q blocks [first[j], nq), without masking from split[j] on.
    first = [next((i for i in range(t.nq) if t.visible[i] > j), t.nq) for j in range(t.nk)]
    split = [max(first[j], next((i for i in range(t.nq) if t.unmasked[i] > j), t.nq))
             for j in range(t.nk)]

    def one_k_block(dq, args):
        j, first_j, split_j = args
        k_tile = lax.dynamic_slice_in_dim(k, j * t.bk, t.bk, axis=2)
        v_tile = lax.dynamic_slice_in_dim(v, j * t.bk, t.bk, axis=2)

        def step(masked):
            def body(i, carry):
                dq, dk, dv = carry
                q_block, do_block = q_blocks[i], dout_blocks[i]
                s, keep = t.scores(q_block, k, mask, seed, i, j, masked)
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
                ds = (probs * (dp - delta_blocks[i][..., None])).astype(q_block.dtype)
                dk = dk + jnp.einsum("bhqk,bhqe->bhke", ds, q_block,
                                     preferred_element_type=acc)
                dq = dq.at[i].add(jnp.einsum("bhqk,bhke->bhqe", ds, k_tile,
                                             preferred_element_type=acc))
                return dq, dk, dv
            return body

        init = (dq, jnp.zeros(k_tile.shape, acc), jnp.zeros(v_tile.shape, acc))
        carry = lax.fori_loop(first_j, split_j, step(True), init)
        dq, dk, dv = lax.fori_loop(split_j, t.nq, step(False), carry)
        return dq, (dk, dv)

    dq0 = jnp.zeros((*q_blocks.shape[:-1], p.head_dim), acc)
    dq, (dk, dv) = lax.scan(one_k_block, dq0, (jnp.arange(t.nk), jnp.array(first, jnp.int32),
                                               jnp.array(split, jnp.int32)))
    # ds is the gradient of the scaled scores.
    dq = t.unblock(dq, p.head_dim) * jnp.asarray(p.scale, acc)
    if not t.prescaled:
        dk = dk * jnp.asarray(p.scale, acc)

    def unblock_kv(x):
        x = jnp.moveaxis(x, 0, 2).reshape(p.batch, p.kv_heads, t.nk * t.bk, x.shape[-1])
        return x[:, :, :p.kv_len]

    return dq.astype(q.dtype), unblock_kv(dk).astype(k.dtype), unblock_kv(dv).astype(v.dtype)
