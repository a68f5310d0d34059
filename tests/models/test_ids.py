"""Token ids outside the vocabulary: refused eagerly, and inside ``jit`` with ``check_ids=True``
(unchecked there, a too large id embeds as NaN and a negative one wraps round)."""

import functools

import jax
import numpy as np
import pytest

from transformax.models import bert, gpt, llama

MODELS = {"gpt": (gpt, gpt.Config(vocab_size=96, n_layer=1, n_head=2, n_embd=16,
                                  block_size=16)),
          "llama": (llama, llama.Config(vocab_size=96, n_layer=1, n_head=2, n_kv_head=1, dim=16,
                                        hidden_dim=32, max_seq_len=16)),
          "bert": (bert, bert.Config(vocab_size=96, n_layer=1, n_head=2, dim=16, hidden_dim=32,
                                     max_position=16))}
TOKENS = np.random.RandomState(1).randint(0, 96, (2, 8)).astype(np.int32)


@functools.cache
def model(name):
    """``(params, cfg, jitted apply)`` of a one-layer model (compiled once per ``check_ids``)."""
    module, cfg = MODELS[name]
    apply = jax.jit(module.apply, static_argnames=("cfg", "check_ids"))
    return module.init(jax.random.key(0), cfg), cfg, apply


def with_id(value, later=500):
    """``TOKENS`` with ``value`` at ``(1, 3)`` and ``later`` at ``(1, 6)``."""
    tokens = TOKENS.copy()
    tokens[1, 3], tokens[1, 6] = value, later
    return tokens


def message(value, name="tokens", index=(1, 3), vocab=96):
    return (rf"{name}: token id {value} at index \({index[0]}, {index[1]}\) is outside the "
            rf"model's vocabulary \[0, {vocab}\)")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("value", [96, -1])
def test_bad_id_named_eager_and_jitted(name, value):
    params, cfg, apply = model(name)
    module = MODELS[name][0]
    tokens = with_id(value)  # the first bad id is named
    with jax.disable_jit(), pytest.raises(ValueError, match=message(value)):
        module.apply(params, tokens, cfg)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message(value)):
        jax.block_until_ready(apply(params, tokens, cfg, check_ids=True))


@pytest.mark.parametrize("name", MODELS)
def test_good_ids_unchanged(name):
    params, cfg, apply = model(name)
    plain = apply(params, TOKENS, cfg)
    checked = apply(params, TOKENS, cfg, check_ids=True)
    np.testing.assert_array_equal(checked, plain)


def test_unchecked_jit_documented_behaviour():
    """What ``check_ids=True`` guards against: NaN for a too large id, row ``V - 1`` for -1."""
    params, cfg, apply = model("gpt")
    unchecked = functools.partial(apply, cfg=cfg)
    assert np.isnan(unchecked(params, with_id(96, 0))[1, 3]).all()
    np.testing.assert_array_equal(unchecked(params, with_id(-1, 0)),
                                  unchecked(params, with_id(95, 0)))


def test_bert_token_type_ids_checked():
    params, cfg, apply = model("bert")
    types = np.zeros_like(TOKENS)
    types[0, 2] = 2
    with jax.disable_jit(), pytest.raises(ValueError, match=message(2, "token_type_ids",
                                                                    (0, 2), 2)):
        bert.apply(params, TOKENS, cfg, token_type_ids=types)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message(2, "token_type_ids", (0, 2),
                                                                 2)):
        jax.block_until_ready(apply(params, TOKENS, cfg, token_type_ids=types, check_ids=True))


def test_checked_under_vmap():
    """Under ``vmap`` the check runs on every row: good rows pass, a bad one is named (its
    index within the row)."""
    params, cfg, _ = model("gpt")
    rows = jax.jit(jax.vmap(lambda t: gpt.apply(params, t[None], cfg, check_ids=True)))
    np.testing.assert_allclose(rows(TOKENS)[:, 0], model("gpt")[2](params, TOKENS, cfg),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message(-1, index=(0, 3))):
        jax.block_until_ready(rows(with_id(-1, 0)))


@functools.cache
def cached_step():
    """The gpt model's ``apply_cached`` jitted (cache of 10 positions); compiled once per
    ``check_ids``."""
    params, cfg, _ = model("gpt")
    return jax.jit(functools.partial(gpt.apply_cached, params, cfg=cfg),
                   static_argnames="check_ids")


@pytest.mark.parametrize("check_ids", [False, True])
def test_apply_cached_checked_inside_jit(check_ids):
    """``apply_cached(check_ids=True)`` inside ``jit``: a bad id and a write past the cache
    raise when run; good calls give the unchecked result. Unchecked, both pass silently."""
    cfg = model("gpt")[1]
    step = functools.partial(cached_step(), check_ids=check_ids)
    cache = gpt.init_cache(cfg, 2, 10)
    logits, cache = step(TOKENS, cache=cache)
    np.testing.assert_allclose(logits, model("gpt")[2](model("gpt")[0], TOKENS, cfg),
                               rtol=1e-5, atol=1e-5)
    bad = with_id(96, 0)
    over = TOKENS  # 8 more tokens after 8, in a cache of 10
    if not check_ids:
        jax.block_until_ready((step(bad, cache=gpt.init_cache(cfg, 2, 10)),
                               step(over, cache=cache)))
        return
    with pytest.raises(jax.errors.JaxRuntimeError, match=message(96)):
        jax.block_until_ready(step(bad, cache=gpt.init_cache(cfg, 2, 10)))
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"8 tokens do not fit the cache: a row already holds 8 of its "
                             r"max_len=10 positions"):
        jax.block_until_ready(step(over, cache=cache))


def test_generate_checked_inside_jit():
    """``generate(check_ids=True)`` under a user's ``jit`` (traced prompts and lengths): good
    prompts give the eager tokens; a bad id or length raises when run."""
    from transformax import generate

    params, cfg, _ = model("gpt")
    run = jax.jit(lambda p, n: generate(gpt, params, cfg, p, lengths=n, max_new_tokens=3,
                                        temperature=0, check_ids=True))
    lengths = np.array([8, 5], np.int32)
    np.testing.assert_array_equal(
        run(TOKENS, lengths),
        generate(gpt, params, cfg, TOKENS, lengths=lengths, max_new_tokens=3, temperature=0))
    with pytest.raises(jax.errors.JaxRuntimeError, match=message(-1, "prompts")):
        jax.block_until_ready(run(with_id(-1, 0), lengths))
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"lengths must be \(2,\) with values in \[1, 8\], got values in "
                             r"\[0, 8\]"):
        jax.block_until_ready(run(TOKENS, np.array([8, 0], np.int32)))
