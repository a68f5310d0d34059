"""Blockwise flash attention in plain JAX (the CPU default).

Online softmax over key/value blocks with f32 statistics; memory is O(L·E): the scores exist
one ``(block_q, block_k)`` tile at a time. Tiles a causal mask hides completely are never
computed, tiles it shows completely skip the masking work. The backward pass recomputes the
probabilities from the saved log-sum-exp (FlashAttention-2's scheme).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from transformax.attention.problem import Problem, dropout_keep, finite_or_zero, mask_scores


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    return []


@functools.lru_cache(maxsize=None)
def block_sizes(problem: Problem) -> tuple[int, int]:
    """(block_q, block_k): large enough that the two matmuls dominate the softmax work."""
    block_q = min(256 if problem.q_len >= 768 else 64, _round_up(problem.q_len, 8))
    block_k = min(512, _round_up(problem.kv_len, 8))
    return block_q, block_k


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Tiles:
    """Static tiling of one problem: padded operands and per-q-block key-block ranges."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.bq, self.bk = block_sizes(problem)
        self.nq = -(-problem.q_len // self.bq)
        self.nk = -(-problem.kv_len // self.bk)
        ragged = problem.kv_len % self.bk != 0
        visible, unmasked = [], []
        for i in range(self.nq):
            row0, row1 = i * self.bq, min((i + 1) * self.bq, problem.q_len)
            status = [problem.tile_visibility(row0, row1, j * self.bk,
                                              min((j + 1) * self.bk, problem.kv_len))
                      for j in range(self.nk)]
            hi = max([j + 1 for j, s in enumerate(status) if s != "none"], default=0)
            full = 0
            while (full < hi and status[full] == "full" and not problem.has_mask
                   and not problem.has_dropout and not (ragged and full == self.nk - 1)):
                full += 1
            visible.append(hi)
            unmasked.append(full)
        self.visible = tuple(visible)  # key blocks [0, visible[i]) may be seen
        self.unmasked = tuple(unmasked)  # key blocks [0, unmasked[i]) need no mask

    def pad(self, x, axis: int, block: int):
        extra = _round_up(x.shape[axis], block) - x.shape[axis]
        if not extra:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    def grouped(self, x):
        """``(B, Hq, ...)`` -> ``(B, Hk, G, ...)``."""
        p = self.p
        return x.reshape(p.batch, p.kv_heads, p.groups, *x.shape[2:])

    def q_blocks(self, x):
        """``(B, Hq, L, D)`` -> ``(nq, B, Hk, G, bq, D)``."""
        x = self.grouped(self.pad(x, 2, self.bq))
        x = x.reshape(*x.shape[:3], self.nq, self.bq, *x.shape[4:])
        return jnp.moveaxis(x, 3, 0)

    def row_blocks(self, x):
        """``(B, Hq, L)`` -> ``(nq, B, Hk, G, bq)``."""
        return self.q_blocks(x[..., None])[..., 0]

    def unblock(self, x, length: int):
        """Inverse of ``q_blocks``/``row_blocks`` (trailing dims kept)."""
        x = jnp.moveaxis(x, 0, 3)
        x = x.reshape(self.p.batch, self.p.q_heads, self.nq * self.bq, *x.shape[5:])
        return x[:, :, :length]

    def scores(self, q_block, k, mask, seed, i, j, masked: bool):
        """f32 scaled scores of q block ``i`` against key block ``j`` (``-inf`` where hidden),
        and the dropout keep-mask (or None)."""
        p = self.p
        k_tile = lax.dynamic_slice_in_dim(k, j * self.bk, self.bk, axis=2)
        s = jnp.einsum("bhgqe,bhke->bhgqk", q_block, k_tile, preferred_element_type=jnp.float32)
        if p.dtype != jnp.float32:
            s = s * jnp.float32(p.scale)
        rows = i * self.bq + lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 0)
        cols = j * self.bk + lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 1)
        if masked:
            mask_tile = None if mask is None else self.mask_tile(mask, i, j)
            s = mask_scores(p, s, rows, cols, mask_tile)
            if p.kv_len % self.bk:
                s = jnp.where(cols < p.kv_len, s, -jnp.inf)
        keep = None
        if p.has_dropout:
            heads = jnp.arange(p.q_heads).reshape(p.kv_heads, p.groups)
            batch_head = jnp.arange(p.batch)[:, None, None] * p.q_heads + heads
            keep = dropout_keep(seed, p.dropout_p, batch_head[..., None, None], rows, cols)
        return s, keep

    def mask_tile(self, mask, i, j):
        """The dense mask's tile for (i, j), shaped to broadcast against ``(B, Hk, G, bq, bk)``."""
        p = self.p
        m = mask
        if m.shape[2] != 1:
            m = lax.dynamic_slice_in_dim(m, i * self.bq, self.bq, axis=2)
        if m.shape[3] != 1:
            m = lax.dynamic_slice_in_dim(m, j * self.bk, self.bk, axis=3)
        if m.shape[1] == 1:
            return m[:, :, None]
        return m.reshape(m.shape[0], p.kv_heads, p.groups, *m.shape[2:])

    def prepare(self, q, k, v, mask):
        """Pads and scales the operands once for the tile loops."""
        p = self.p
        if p.dtype == jnp.float32:
            q = q * jnp.float32(p.scale)
        k, v = self.pad(k, 2, self.bk), self.pad(v, 2, self.bk)
        if mask is not None:
            if mask.shape[2] != 1:
                mask = self.pad(mask, 2, self.bq)
            if mask.shape[3] != 1:
                mask = self.pad(mask, 3, self.bk)
        return self.q_blocks(q), k, v, mask


def forward(problem: Problem, q, k, v, mask, seed):
    t = _Tiles(problem)
    q_blocks, k, v, mask = t.prepare(q, k, v, mask)
    p = problem

    def one_q_block(args):
        i, q_block = args
        acc_shape = (p.batch, p.kv_heads, p.groups, t.bq)

        def step(masked):
            def body(j, carry):
                row_max, total, acc = carry
                s, keep = t.scores(q_block, k, mask, seed, i, j, masked)
                new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
                safe_max = finite_or_zero(new_max)
                correction = jnp.exp(row_max - safe_max)
                weights = jnp.exp(s - safe_max[..., None])
                total = total * correction + jnp.sum(weights, axis=-1)
                if keep is not None:
                    weights = jnp.where(keep, weights, 0.0)
                v_tile = lax.dynamic_slice_in_dim(v, j * t.bk, t.bk, axis=2)
                pv = jnp.einsum("bhgqk,bhkd->bhgqd", weights.astype(v.dtype), v_tile,
                                preferred_element_type=jnp.float32)
                return new_max, total, acc * correction[..., None] + pv
            return body

        init = (jnp.full(acc_shape, -jnp.inf, jnp.float32), jnp.zeros(acc_shape, jnp.float32),
                jnp.zeros((*acc_shape, p.v_head_dim), jnp.float32))
        unmasked, visible = jnp.array(t.unmasked)[i], jnp.array(t.visible)[i]
        carry = lax.fori_loop(0, unmasked, step(False), init)
        row_max, total, acc = lax.fori_loop(unmasked, visible, step(True), carry)
        visible = total > 0
        safe_total = jnp.where(visible, total, 1.0)
        out = acc / safe_total[..., None]
        if p.has_dropout:
            out = out / (1.0 - p.dropout_p)
        lse = jnp.where(visible, finite_or_zero(row_max) + jnp.log(safe_total), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = lax.map(one_q_block, (jnp.arange(t.nq), q_blocks))
    return t.unblock(out, p.q_len), t.unblock(lse[..., None], p.q_len)[..., 0]


def backward(problem: Problem, q, k, v, mask, seed, out, lse, dout, dlse):
    t = _Tiles(problem)
    p = problem
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - dlse
    q_blocks, k, v, mask = t.prepare(q, k, v, mask)
    dout_blocks = t.q_blocks(dout)
    lse_blocks = finite_or_zero(t.row_blocks(lse))  # hidden rows: p = exp(-inf - 0) = 0
    delta_blocks = t.row_blocks(delta)
    # Key block j is seen by q blocks [first[j], nq), unmasked by [first_unmasked[j], nq).
    visible, unmasked = t.visible, t.unmasked
    first = [next((i for i in range(t.nq) if visible[i] > j), t.nq) for j in range(t.nk)]
    first_unmasked = [max(first[j], next((i for i in range(t.nq) if unmasked[i] > j), t.nq))
                      for j in range(t.nk)]

    def one_k_block(dq, args):
        j, first_j, split = args
        k_tile = lax.dynamic_slice_in_dim(k, j * t.bk, t.bk, axis=2)
        v_tile = lax.dynamic_slice_in_dim(v, j * t.bk, t.bk, axis=2)

        def step(masked):
            def body(i, carry):
                dq, dk, dv = carry
                q_block, do_block = q_blocks[i], dout_blocks[i]
                s, keep = t.scores(q_block, k, mask, seed, i, j, masked)
                probs = jnp.exp(s - lse_blocks[i][..., None])
                dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_block, v_tile,
                                preferred_element_type=jnp.float32)
                if keep is not None:
                    inv_keep = 1.0 / (1.0 - p.dropout_p)
                    dropped = jnp.where(keep, probs * inv_keep, 0.0)
                    dp = jnp.where(keep, dp * inv_keep, 0.0)
                else:
                    dropped = probs
                dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", dropped.astype(do_block.dtype),
                                     do_block, preferred_element_type=jnp.float32)
                ds = (probs * (dp - delta_blocks[i][..., None])).astype(q_block.dtype)
                dk = dk + jnp.einsum("bhgqk,bhgqe->bhke", ds, q_block,
                                     preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bhgqk,bhke->bhgqe", ds, k_tile,
                                  preferred_element_type=jnp.float32)
                dq = dq.at[i].add(dq_i)
                return dq, dk, dv
            return body

        init = (dq, jnp.zeros(k_tile.shape, jnp.float32), jnp.zeros(v_tile.shape, jnp.float32))
        carry = lax.fori_loop(first_j, split, step(True), init)
        dq, dk, dv = lax.fori_loop(split, t.nq, step(False), carry)
        return dq, (dk, dv)

    dq0 = jnp.zeros((*q_blocks.shape[:-1], p.head_dim), jnp.float32)
    dq, (dk, dv) = lax.scan(one_k_block, dq0, (jnp.arange(t.nk), jnp.array(first, jnp.int32),
                                               jnp.array(first_unmasked, jnp.int32)))
    # ds is the gradient of the scaled scores; q was pre-scaled for f32 only.
    dq = t.unblock(dq, p.q_len) * jnp.float32(p.scale)
    if p.dtype != jnp.float32:
        dk = dk * jnp.float32(p.scale)
    dk = jnp.moveaxis(dk, 0, 2).reshape(p.batch, p.kv_heads, t.nk * t.bk, p.head_dim)
    dv = jnp.moveaxis(dv, 0, 2).reshape(p.batch, p.kv_heads, t.nk * t.bk, p.v_head_dim)
    return (dq.astype(q.dtype), dk[:, :, :p.kv_len].astype(k.dtype),
            dv[:, :, :p.kv_len].astype(v.dtype))
