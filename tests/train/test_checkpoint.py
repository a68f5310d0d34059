"""Checkpoints: what a save holds comes back bit for bit; damaged ones are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformax.train.checkpoint import CheckpointError, Checkpoints
from transformax.train.step import init_state


def state_at(step, seed=7):
    params = {"w": jnp.arange(6.0).reshape(2, 3) + step}
    return init_state(params, optax.sgd(0.1), seed)._replace(step=jnp.int32(step))


def target(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)


def test_restore_returns_every_field_including_the_rng_key(tmp_path):
    saved = state_at(3)
    assert np.asarray(saved.rng).any()  # seed 7: a raw key with nonzero bits
    ckpts = Checkpoints(tmp_path / "ckpts", 2)
    assert not (tmp_path / "ckpts").exists()  # created by the first save, not before
    ckpts.save(saved, {"seed": 7})
    state, config = ckpts.restore(target(saved))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert config == {"seed": 7}
    ckpts.close()


def test_restore_newest_skips_damaged_and_refused_checkpoints(tmp_path):
    ckpts = Checkpoints(tmp_path, 3)
    for step in (1, 2, 3):
        ckpts.save(state_at(step), {"step": step})
    (tmp_path / "3" / "config" / "metadata").write_text("{torn")
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 3 in .* does not restore "
                                            r"\(JSONDecodeError: .*\); skipped, using step 2"):
        state, config, step, damaged = ckpts.restore_newest(target(state_at(0)))
    assert (step, damaged, config, int(state.step)) == (2, [3], {"step": 2}, 2)

    def refuse(config):
        raise ValueError(f"refused {config}")

    with pytest.raises(ValueError, match="refused {'step': 2}"):
        ckpts.restore_newest(target(state_at(0)), refuse)
    moved = ckpts.set_aside(3, tmp_path.parent / "aside")
    assert ckpts.all_steps() == [1, 2] and (moved / "config").is_dir()
    ckpts.save(state_at(3), {"step": 3})  # the step is free again
    assert ckpts.restore_newest(target(state_at(0)))[2] == 3
    ckpts.close()


def test_no_restorable_checkpoint_is_an_error(tmp_path):
    ckpts = Checkpoints(tmp_path, 3)
    ckpts.save(state_at(1), {})
    (tmp_path / "1" / "config" / "metadata").write_text("")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores \(step 1: "):
        ckpts.restore_newest(target(state_at(0)))
    ckpts.close()
