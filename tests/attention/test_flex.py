"""tfx.flex_attention and the structured masks against torch: forward values against torch's own
flex_attention (eager, CPU), gradients against torch autograd through the same dense
formulation; score_mod functions written once, run by both libraries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import transformax as tfx

B, HQ, HK, L, S, E = 2, 4, 2, 32, 48, 16
RNG = np.random.default_rng(0)
Q, K, V = (RNG.standard_normal(shape).astype(np.float32)
           for shape in ((B, HQ, L, E), (B, HK, S, E), (B, HK, S, E)))
DOUT = RNG.standard_normal((B, HQ, L, E)).astype(np.float32)
SLOPES = np.linspace(0.25, 1.0, HQ).astype(np.float32)
BIAS = (0.5 * RNG.standard_normal(L + S)).astype(np.float32)
DOCS = np.repeat(np.array([[0, 1, 2, 3], [0, 0, 1, 2]]), [8, 8, 8, 8], axis=1)
KV_DOCS = np.repeat(np.array([[0, 1, 2, 3], [0, 0, 1, 2]]), [12, 12, 12, 12], axis=1)


# Written once with indexing and arithmetic only: run by torch on tensors, by transformax on
# jnp arrays. ``xp`` supplies tanh.
def alibi(slopes):
    return lambda score, b, h, q, kv: score + slopes[h] * (kv - q)


def softcap(xp):
    return lambda score, b, h, q, kv: 4.0 * xp.tanh(score / 4.0)


def relative_bias(table):
    return lambda score, b, h, q, kv: score + table[kv - q + L]


def window(size):
    return lambda b, h, q, kv: (q + (S - L) - kv >= 0) & (q + (S - L) - kv < size)


def documents(q_docs, kv_docs):
    return lambda b, h, q, kv: q_docs[b, q] == kv_docs[b, kv]


def prefix(lengths):
    return lambda b, h, q, kv: (kv <= q) | (kv < lengths[b])


SCORE_MODS = {
    "none": (lambda xp, arr: None, None),
    "alibi": (lambda xp, arr: alibi(arr), SLOPES),
    "softcap": (lambda xp, arr: softcap(xp), None),
    "relative_bias": (lambda xp, arr: relative_bias(arr), BIAS),
}
MASKS = {  # name -> (mask_mod over arrays of xp, tfx structured mask or None)
    "none": (lambda xp: None, None),
    "window": (lambda xp: window(9), tfx.sliding_window(L, S, 9, lower_right=True)),
    "documents": (lambda xp: documents(xp.asarray(DOCS), xp.asarray(KV_DOCS)),
                  tfx.document_mask(DOCS, KV_DOCS)),
    "prefix_lm": (lambda xp: prefix(xp.asarray(np.array([6, 20]))),
                  tfx.prefix_lm(L, S, jnp.array([6, 20]))),
    "documents_and_window": (
        lambda xp: lambda b, h, q, kv: documents(xp.asarray(DOCS), xp.asarray(KV_DOCS))(
            b, h, q, kv) & window(9)(b, h, q, kv),
        tfx.document_mask(DOCS, KV_DOCS) & tfx.sliding_window(L, S, 9, lower_right=True)),
}


def torch_reference(score_name: str, mask_name: str):
    """torch flex_attention's output, and autograd's gradients through the dense formulation."""
    make_score, array = SCORE_MODS[score_name]
    captured = None if array is None else torch.tensor(array, requires_grad=True)
    score_mod = make_score(torch, captured)
    mask_mod = MASKS[mask_name][0](torch)
    q, k, v = (torch.tensor(x, requires_grad=True) for x in (Q, K, V))
    block_mask = None if mask_mod is None else torch_flex.create_block_mask(
        mask_mod, B, None, L, S, device="cpu")
    with torch.no_grad():  # torch has no flex backward on CPU
        flex_out = torch_flex.flex_attention(*(x.detach() for x in (q, k, v)),
                                             score_mod=make_score(torch, None if array is None
                                                                  else torch.tensor(array)),
                                             block_mask=block_mask, enable_gqa=True)
    dense_out = dense_attention(q, k, v, score_mod, mask_mod)
    dense_out.backward(torch.tensor(DOUT))
    grads = [x.grad.numpy() for x in (q, k, v)] + ([captured.grad.numpy()] if array is not None
                                                   else [])
    return flex_out.numpy(), dense_out.detach().numpy(), grads


def dense_attention(q, k, v, score_mod, mask_mod):
    """torch: softmax(score_mod(q k^T / sqrt(E)) masked by mask_mod) v, materialised (GQA)."""
    scores = q @ torch.repeat_interleave(k, HQ // HK, 1).transpose(-1, -2) / np.sqrt(E)
    b, h, qi, ki = torch.meshgrid(*(torch.arange(n) for n in scores.shape), indexing="ij")
    if score_mod is not None:
        scores = score_mod(scores, b, h, qi, ki)
    if mask_mod is not None:
        scores = scores.masked_fill(~mask_mod(b, h, qi, ki), -torch.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows seeing no key: zeros, as flex
    return probs @ torch.repeat_interleave(v, HQ // HK, 1)


def transformax_result(score_name: str, mask_name: str, structured: bool, jit: bool):
    make_score, array = SCORE_MODS[score_name]
    block_mask = MASKS[mask_name][1] if structured else None
    mask_mod = MASKS[mask_name][0](jnp)
    if not structured and mask_mod is not None:
        block_mask = tfx.create_block_mask(mask_mod, B, None, L, S, BLOCK_SIZE=16)

    def run(q, k, v, captured):
        score_mod = make_score(jnp, captured)
        return tfx.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                  enable_gqa=True)

    run = jax.jit(run) if jit else run
    captured = jnp.zeros(()) if array is None else jnp.asarray(array)
    out, vjp = jax.vjp(run, jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V), captured)
    grads = vjp(jnp.asarray(DOUT))
    return np.asarray(out), [np.asarray(g) for g in grads[:3 if array is None else 4]]


@pytest.mark.parametrize("score_name, mask_name, structured, jit", [
    ("none", "window", True, True),
    ("none", "documents", False, True),
    ("none", "prefix_lm", True, False),
    ("none", "documents_and_window", True, True),
    ("alibi", "none", False, True),
    ("alibi", "window", False, False),
    ("softcap", "documents", True, True),
    ("relative_bias", "prefix_lm", True, True),
])
def test_matches_torch_flex(score_name, mask_name, structured, jit):
    flex_out, dense_out, want_grads = torch_reference(score_name, mask_name)
    np.testing.assert_allclose(flex_out, dense_out, atol=2e-5)  # the two torch paths agree
    out, grads = transformax_result(score_name, mask_name, structured, jit)
    np.testing.assert_allclose(out, flex_out, atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dcaptured"), grads, want_grads):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got / scale, want / scale, atol=2e-5, err_msg=name)


def test_jit_and_eager_agree_on_traced_document_ids():
    """Block masks computed under jit from traced arrays (a packed batch's document ids)."""
    def run(q, k, v, ids):
        ids = jnp.asarray(ids)
        mask = tfx.create_block_mask(lambda b, h, qi, ki: ids[b, qi] == ids[b, ki],
                                     B, None, L, L, BLOCK_SIZE=8)
        return tfx.flex_attention(q, k[:, :, :L], v[:, :, :L], block_mask=mask, enable_gqa=True)

    args = (Q, K, V, DOCS)
    np.testing.assert_allclose(jax.jit(run)(*args), run(*args), atol=1e-6)
    with jax.disable_jit():
        np.testing.assert_allclose(run(*args), jax.jit(run)(*args), atol=1e-6)


def _hull(dense):
    """Numpy: each row's first visible key and last + 1 over all heads, and whether every row of
    every head sees all of its hull."""
    rows = dense.any(axis=1)
    cols = np.arange(dense.shape[-1])
    hi = np.where(rows, cols + 1, 0).max(-1)
    lo = np.minimum(np.where(rows, cols, dense.shape[-1]).min(-1), hi)
    return lo, hi, bool((dense.sum(-1) == (hi - lo)[:, None]).all())


BLOCK_MASK_MODS = {  # name -> (mask_mod, whether each row's visible keys are contiguous)
    "documents": (documents(jnp.asarray(DOCS), jnp.asarray(DOCS)), True),
    "causal_window_per_head": (lambda b, h, q, kv: (kv <= q) & (q - kv < 4 + 4 * h), False),
    "strided": (lambda b, h, q, kv: (kv % 3 != 1) & (kv <= q), False),
}


@pytest.mark.parametrize("name", BLOCK_MASK_MODS)
def test_block_mask_records_its_rows_hulls(name):
    mask_mod, contiguous = BLOCK_MASK_MODS[name]
    dense = np.broadcast_to(mask_mod(*np.ix_(*map(np.arange, (B, HQ, L, L)))), (B, HQ, L, L))
    lo, hi, exact = _hull(dense)
    assert exact == contiguous
    mask = tfx.create_block_mask(mask_mod, B, HQ, L, L, BLOCK_SIZE=16)
    np.testing.assert_array_equal(mask.lo, lo)
    np.testing.assert_array_equal(mask.hi, hi)
    assert bool(mask.exact) == exact


@pytest.mark.parametrize("name", ["documents", "strided"])
def test_block_mask_given_to_jit_matches_its_dense_mask(name):
    """A block mask made once and passed to a jitted function (its arrays traced): exact hulls
    run on the key intervals alone (a lax.cond on the traced flag), other masks as before."""
    mask_mod = BLOCK_MASK_MODS[name][0]
    block_mask = tfx.create_block_mask(mask_mod, B, None, L, L, BLOCK_SIZE=16)
    dense = torch.tensor(np.broadcast_to(mask_mod(*np.ix_(*map(np.arange, (B, 1, L, L)))),
                                         (B, 1, L, L)))
    args = (Q, K[:, :, :L], V[:, :, :L])
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in args)
    want = dense_attention(tq, tk, tv, None, lambda b, h, q, kv: dense[b, 0, q, kv])
    want.backward(torch.tensor(DOUT))
    flex = lambda q, k, v, mask: tfx.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    got, vjp = jax.jit(lambda *a: jax.vjp(lambda *x: flex(*x, a[-1]), *a[:-1]))(
        *args, block_mask)
    with jax.disable_jit():
        np.testing.assert_allclose(flex(*args, block_mask), got, atol=1e-6)
    np.testing.assert_allclose(got, want.detach().numpy(), atol=2e-5)
    for g, x in zip(vjp(jnp.asarray(DOUT)), (tq, tk, tv)):
        np.testing.assert_allclose(g, x.grad.numpy(), atol=2e-5)


def _mask_fns(jaxpr) -> list:
    """The mask_fn of every attention op in ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "transformax_sdpa":
            found.append(eqn.params["problem"].mask_fn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _mask_fns(sub)
    return found


def test_exact_block_mask_never_evaluates_its_mask_mod_again():
    mask_mod = BLOCK_MASK_MODS["documents"][0]
    block_mask = tfx.create_block_mask(mask_mod, B, None, L, L, BLOCK_SIZE=16)
    args = (Q, K[:, :, :L], V[:, :, :L])
    flex = lambda q, k, v, mask: tfx.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    # Known when traced (a concrete block mask): one op, on the key intervals alone.
    assert _mask_fns(jax.make_jaxpr(lambda *a: flex(*a, block_mask))(*args).jaxpr) == [None]
    # Traced: a lax.cond between the intervals alone and the mask_mod.
    fns = _mask_fns(jax.make_jaxpr(flex)(*args, block_mask).jaxpr)
    assert len(fns) == 2 and fns.count(None) == 1


def _problems(jaxpr) -> list:
    """The problem of every attention op in ``jaxpr`` and the jaxprs inside it."""
    found = [eqn.params["problem"] for eqn in jaxpr.eqns
             if eqn.primitive.name == "transformax_sdpa"]
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _problems(sub)
    return found


def test_generic_mask_without_create_block_mask_is_analysed_once():
    """A mask that is neither intervals nor ids (here ``|`` of two) gets create_block_mask's
    analysis in the call, once for the forward and backward of every kernel: where every row's
    keys are contiguous the call runs on intervals alone (decided when traced for a mask of the
    indices alone, by a cond for one of traced arrays), else the mask_mod with its block
    table. Values and gradients equal the dense mask's."""
    static = tfx.chunked(L, L, 8) | tfx.sliding_window(L, L, 3)
    data = lambda ids: tfx.document_mask(ids) | tfx.sliding_window(L, L, 5)
    args = [jnp.asarray(x[:, :, :L]) for x in (Q, K, V)]
    flex = lambda q, k, v, mask: tfx.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    ops = _problems(jax.make_jaxpr(lambda *a: flex(*a, static))(*args).jaxpr)
    assert [p.mask_fn for p in ops] == [None] and ops[0].bounds
    ops = _problems(jax.make_jaxpr(lambda *a: flex(*a[:3], data(a[3])))(*args, DOCS).jaxpr)
    assert sorted(p.table_blocks is not None for p in ops) == [False, True]

    def loss(q, k, v, ids, dense):
        mask = data(ids) if dense is None else dense
        return jnp.sum(tfx.sdpa(q, k, v, attn_mask=mask, enable_gqa=True) * DOUT[:, :, :L])

    no_keys = jnp.zeros((1, 2, 0, 4))  # nothing to analyse: zeros, as without a mask
    out = tfx.sdpa(jnp.ones((1, 2, 8, 4)), no_keys, no_keys,
                   attn_mask=tfx.chunked(8, 0, 4) | tfx.sliding_window(8, 0, 2))
    assert out.shape == (1, 2, 8, 4) and not out.any()
    strided = jnp.asarray(DOCS).at[1].set(jnp.arange(L) % 3)  # rows see several spans
    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    for ids in (jnp.asarray(DOCS), strided):
        got, want = grad(*args, ids, None), grad(*args, ids, data(ids).to_dense())
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_eager_calls_with_new_functions_reuse_compiled_kernels():
    """A score_mod / mask_mod written anew for every call (a new function object computing the
    same thing) compiles nothing again; one computing something else is not mistaken for it."""
    from transformax.attention import masks, primitive
    ids = jnp.asarray(DOCS)

    def call(cap):
        mask = tfx.create_block_mask(lambda b, h, q, kv: ids[b, q] == ids[b, kv], B, None, L, L,
                                     BLOCK_SIZE=16)
        return tfx.flex_attention(Q, K[:, :, :L], V[:, :, :L], block_mask=mask,
                                  score_mod=lambda s, b, h, q, kv: cap * jnp.tanh(s / cap),
                                  enable_gqa=True)

    first = call(4.0)
    compiled = (primitive._compiled.cache_info().misses, masks._analyse._cache_size())
    np.testing.assert_array_equal(call(4.0), first)
    assert (primitive._compiled.cache_info().misses, masks._analyse._cache_size()) == compiled
    assert np.abs(call(0.5) - first).max() > 1e-2


def test_block_mask_classifies_its_tiles():
    mask = tfx.create_block_mask(lambda b, h, q, kv: kv <= q, None, None, 40, 40, BLOCK_SIZE=16)
    np.testing.assert_array_equal(mask.table[0, 0], [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    np.testing.assert_array_equal(mask.to_dense(), np.tril(np.ones((40, 40), bool)))


def test_structured_masks_are_their_dense_forms():
    np.testing.assert_array_equal(tfx.sliding_window(6, 6, 3).to_dense(),
                                  np.tri(6, 6, 0, bool) & ~np.tri(6, 6, -3, bool))
    np.testing.assert_array_equal(tfx.chunked(4, 4, 2).to_dense(),
                                  np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))
    np.testing.assert_array_equal(tfx.prefix_lm(4, 4, 2).to_dense(),
                                  np.tri(4, 4, 0, bool) | (np.arange(4) < 2))
    padding = tfx.key_padding(np.array([[True, True, False], [True, False, False]]))
    np.testing.assert_array_equal(padding.to_dense()[:, 0, 0], [[1, 1, 0], [1, 0, 0]])
    cache = tfx.band(2, 5, offset=np.array([1, 3])).to_dense()
    np.testing.assert_array_equal(cache[:, 0], [np.tri(2, 5, 1, bool), np.tri(2, 5, 3, bool)])


@pytest.mark.parametrize("call, error, message", [
    (lambda: tfx.sliding_window(8, 8, 0), ValueError, r"window must be an int >= 1; got 0"),
    (lambda: tfx.band(8, 8, left=-1), ValueError, r"left must be None or an int >= 0; got -1"),
    (lambda: tfx.document_mask(np.zeros(8, np.int32)), ValueError,
     r"q_ids \(shape \(8,\), dtype int32\) must be an integer \(B, length\) array"),
    (lambda: tfx.causal_upper_left(8, 8) & np.ones((8, 8), bool), TypeError,
     r"masks combine only with masks"),
    (lambda: tfx.create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 8, 8, BLOCK_SIZE=0),
     ValueError, r"BLOCK_SIZE must be an int >= 1; got 0"),
    (lambda: tfx.flex_attention(Q, K, V, block_mask=np.ones((L, S), bool), enable_gqa=True),
     TypeError, r"block_mask must come from tfx.create_block_mask"),
    (lambda: tfx.flex_attention(Q, K, V, score_mod=lambda s, b, h, q, kv: jnp.stack([s, s]),
                                enable_gqa=True), ValueError,
     r"score_mod must return one scalar per element"),
    (lambda: tfx.sdpa(Q, K, V, attn_mask=tfx.sliding_window(L, L, 4), enable_gqa=True),
     ValueError, r"for key length S 32 but query/key give 48"),
    (lambda: tfx.sdpa(Q, K, V, attn_mask=tfx.document_mask(DOCS[:1].repeat(3, 0),
                                                           KV_DOCS[:1].repeat(3, 0)),
                      enable_gqa=True), ValueError, r"for batch size 3 but query/key give 2"),
])
def test_bad_masks_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_explain_says_why_a_kernel_cannot_run_a_score_mod():
    text = str(tfx.explain(Q, K, V, enable_gqa=True, score_mod=softcap(jnp),
                           attn_mask=tfx.sliding_window(L, S, 8)))
    assert "cudnn" in text and "score_mod: not supported by this kernel" in text
    assert "needs=['key intervals', 'score_mod']" in text


def test_vmap_over_block_masks_runs_one_branch():
    """Block masks made inside ``vmap`` (per-example document ids): one ``lax.cond`` for the
    whole batch (intervals alone where every example's hull is exact, else the mask_mod), not
    both branches and a select; values and gradients equal the dense mask's either way."""
    q, k, v = (jnp.asarray(x[:, :, :L]) for x in (Q, K, V))
    contiguous = jnp.asarray(DOCS)
    mixed = contiguous.at[1].set(jnp.arange(L) % 3)  # example 1: rows see several spans

    def flex(q, k, v, ids):
        mask = tfx.create_block_mask(lambda b, h, i, j: ids[i] == ids[j], None, None, L, L,
                                     BLOCK_SIZE=8)
        return tfx.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)

    def dense(q, k, v, ids):
        return tfx.sdpa(q, k, v, attn_mask=ids[:, None] == ids[None, :], enable_gqa=True)

    def loss(fn):
        return lambda q, ids: jnp.sum(jax.vmap(fn, (0, 0, 0, 0))(q, k, v, ids) * DOUT)

    assert "cond[" in str(jax.make_jaxpr(jax.vmap(flex))(q, k, v, mixed))
    for ids in (contiguous, mixed):
        got = jax.jit(jax.value_and_grad(loss(flex)))(q, ids)
        want = jax.jit(jax.value_and_grad(loss(dense)))(q, ids)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)
