"""The pure train / eval steps, the optimizer and the task losses (jit and non-jit parity)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformax.train import config, data, optim
from transformax.train.loop import init_train_state
from transformax.train.step import accumulate, make_eval_step, make_train_step, step_rng

TINY = str(Path(__file__).parents[2] / "configs" / "gpt_tiny.yaml")
SMALL = ["model.n_layer=1", "model.n_embd=32", "data.seq_len=16", "model.block_size=16",
         "train.batch_size=4", "optim.warmup_steps=2", "train.steps=10"]


def setup(*overrides):
    cfg = config.load(TINY, [*SMALL, *overrides])
    tx = optim.optimizer(cfg.optim, cfg.train.steps)
    task, model_cfg = cfg.task, cfg.model_config

    def loss_fn(p, b, r):
        return task.loss(p, b, model_cfg, r)

    tokens = np.random.default_rng(0).integers(0, 256, 50_000)
    t = cfg.train
    batches = data.Batches(data.Corpus(tokens, tokens, 256, True), cfg.seed,
                           (t.grad_accum, t.batch_size // t.grad_accum), cfg.data.seq_len)
    step = make_train_step(loss_fn, tx, optim.schedule(cfg.optim, t.steps))
    return cfg, step, init_train_state(cfg, tx), batches, loss_fn


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_train_step_jit_matches_op_by_op():
    _, step, state, batches, _ = setup("model.dropout=0.2", "train.grad_accum=2")
    batch = batches(0)
    s_jit, m_jit = jax.jit(step)(state, batch)
    s_eager, m_eager = step(state, batch)  # op by op
    for k in m_jit:
        np.testing.assert_allclose(m_jit[k], m_eager[k], rtol=1e-5)
    assert int(s_jit.step) == int(s_eager.step) == 1
    assert_trees_close(s_jit.params, s_eager.params, 1e-6)
    assert_trees_close(s_jit.opt_state, s_eager.opt_state, 1e-6)


def test_loss_falls_and_metrics():
    cfg, step, state, batches, _ = setup()
    step = jax.jit(step, donate_argnums=0)
    losses = []
    for i in range(10):
        state, m = step(state, batches(i % 2))
        losses.append(float(m["loss"]))
        assert float(m["lr"]) == pytest.approx(float(optim.schedule(cfg.optim, 10)(i)))
        assert float(m["grad_norm"]) > 0
    assert losses[0] == pytest.approx(np.log(256), abs=0.2)
    assert losses[-1] < losses[0] - 0.5
    assert int(state.step) == 10


def test_grad_accumulation_matches_one_big_batch():
    _, step1, state, batches1, _ = setup()
    _, step4, _, batches4, _ = setup("train.grad_accum=4")
    b1, b4 = batches1(3), batches4(3)
    np.testing.assert_array_equal(b1["inputs"].reshape(b4["inputs"].shape), b4["inputs"])
    s1, m1 = jax.jit(step1)(state, b1)
    s4, m4 = jax.jit(step4)(state, b4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert_trees_close(s1.params, s4.params, 1e-6)


def test_accumulate_weights_tokens_not_micro_batches():
    """With masked-LM weights, micro-batches with more counted tokens weigh more."""
    def loss_fn(p, b, r):
        per_token = (p["w"] - b["targets"]) ** 2
        return (per_token * b["weights"]).sum(), b["weights"].sum()

    params = {"w": jnp.array(0.0)}
    batch = {"targets": jnp.array([[1.0, 1.0, 1.0], [4.0, 4.0, 4.0]]),
             "weights": jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])}
    loss, grads = accumulate(loss_fn, params, batch, jax.random.key(0))
    assert float(loss) == pytest.approx((3 * 1 + 16) / 4)
    assert float(grads["w"]) == pytest.approx((3 * -2 + -8) / 4)


def test_dropout_keys_follow_the_step():
    # test_train_step_jit_matches_op_by_op's config: its compiled step (persistent cache)
    _, step, state, batches, _ = setup("model.dropout=0.2", "train.grad_accum=2")
    assert not np.array_equal(jax.random.key_data(step_rng(state)),
                              jax.random.key_data(step_rng(state._replace(step=state.step + 1))))
    jitted = jax.jit(step)
    losses = [float(jitted(state._replace(step=jnp.int32(s)), batches(0))[1]["loss"])
              for s in (0, 0, 5)]
    assert losses[0] == losses[1]  # same (seed, step): same dropout
    assert losses[0] != losses[2]


def test_eval_step_jit_matches_op_by_op():
    _, _, state, batches, loss_fn = setup("train.grad_accum=2")
    batch = batches(0, data.EVAL)
    ev = make_eval_step(loss_fn)
    total, count = jax.jit(ev)(state.params, batch)
    total_e, count_e = ev(state.params, batch)
    np.testing.assert_allclose(total, total_e, rtol=1e-6)
    assert float(count) == float(count_e) == 4 * 16


def test_schedule_warmup_then_cosine():
    cfg = config.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    s = optim.schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)
    assert float(s(110)) == pytest.approx(0.1)


def test_decay_mask():
    cfg, _, state, _, _ = setup()
    mask = optim.decay_mask(state.params, cfg.optim)
    assert mask["blocks"][0]["attn"]["qkv"]["w"] and mask["blocks"][0]["mlp"]["fc"]["w"]
    assert not mask["wte"] and not mask["wpe"]
    assert not mask["blocks"][0]["attn"]["qkv"]["b"] and not mask["ln_f"]["scale"]
    every = optim.decay_mask(state.params, config.OptimConfig(decay_norms_and_biases=True,
                                                              no_decay=[]))
    assert all(jax.tree.leaves(every))


def test_clipping_and_decay_in_the_update():
    cfg = config.OptimConfig(lr=0.1, warmup_steps=0, grad_clip=1.0, weight_decay=0.5,
                             min_lr_ratio=1.0)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = optim.optimizer(cfg, 10)
    grads = {"w": jnp.full((2, 2), 100.0), "b": jnp.zeros(2)}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves by lr * sign(g); decay adds lr * wd * w on matrices only.
    np.testing.assert_allclose(updates["w"], -0.1 - 0.1 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(updates["b"], 0.0)
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0)


@pytest.mark.parametrize("grad_clip, scale", [(1.0, 1 / 6), (10.0, 1.0), (0.0, 1.0)])
def test_grad_clip_bounds_the_gradient_adam_sees(grad_clip, scale):
    """Adam's first update does not depend on the gradient's scale, so look at its first
    moment: ``(1 - b1) * g``, with ``g`` rescaled to norm ``grad_clip`` when it is longer."""
    cfg = config.OptimConfig(lr=0.1, warmup_steps=0, b1=0.9, grad_clip=grad_clip)
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 3.0)}  # global norm 6
    tx = optim.optimizer(cfg, 10)
    _, state = tx.update(grads, tx.init(params), params)
    def is_adam(s):
        return isinstance(s, optax.ScaleByAdamState)

    adam = [s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]
    np.testing.assert_allclose(adam[0].mu["w"], 0.1 * 3.0 * scale, rtol=1e-6)


def test_flops_per_token():
    cfg, _, state, _, _ = setup()
    n = sum(x.size for x in jax.tree.leaves(state.params)) - state.params["wpe"].size
    assert cfg.task.flops_per_token(state.params, cfg.model_config, 16) == 6 * n + 12 * 32 * 16


def test_mlm_loss_counts_masked_positions():
    cfg = config.load(str(Path(TINY).parent / "bert_mlm_small.yaml"),
                      ["model.n_layer=1", "model.dim=32", "model.hidden_dim=64"])
    model_cfg = cfg.model_config
    params = jax.jit(cfg.task.module.init, static_argnums=1)(jax.random.key(0), model_cfg)
    tokens = np.random.default_rng(0).integers(0, 256, 10_000)
    batch = data.Batches(data.Corpus(tokens, tokens, 256, True), 0, (1, 2), 32, 0.15)(0)
    b = jax.tree.map(lambda x: x[0], batch)
    total, count = jax.jit(cfg.task.loss, static_argnums=2)(params, b, model_cfg)
    assert float(count) == b["weights"].sum()
    assert float(total / count) == pytest.approx(np.log(257), abs=0.3)


def test_mixed_precision_keeps_f32_params_and_optimizer_state():
    _, step32, state, batches, _ = setup()
    _, step16, state16, _, _ = setup("model.compute_dtype=bfloat16")
    batch = batches(0)
    s32, m32 = jax.jit(step32)(state, batch)
    s16, m16 = jax.jit(step16)(state16, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((s16.params, s16.opt_state))
               if jnp.issubdtype(x.dtype, jnp.floating))
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # the forward really ran in bf16
