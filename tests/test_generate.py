import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformax import cli, generate
from transformax.models import gpt, llama

apply = jax.jit(lambda module, params, tokens, cfg: module.apply(params, tokens, cfg),
                static_argnums=(0, 3))
apply_cached = jax.jit(lambda module, *args, **kw: module.apply_cached(*args, **kw),
                       static_argnums=(0, 3))
GPT = gpt.Config(vocab_size=96, n_layer=2, n_head=4, n_embd=32, block_size=32, dropout=0.1)
LLAMA = llama.Config(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, dim=32, hidden_dim=64,
                     max_seq_len=32)
MODELS = {"gpt": (gpt, GPT), "llama": (llama, LLAMA)}
LENGTHS = np.array([8, 3], np.int32)


@functools.cache
def built(name):
    module, cfg = MODELS[name]
    return module, jax.jit(module.init, static_argnums=1)(jax.random.key(0), cfg), cfg


@pytest.fixture(params=list(MODELS))
def model(request):
    return built(request.param)


@pytest.fixture
def gpt_model():
    """For the sampling / end-of-sequence logic, which does not depend on the model."""
    return built("gpt")


@pytest.fixture(scope="module")
def prompts():
    """Two right-padded prompts (lengths 8 and 3); the padding is random tokens on purpose."""
    return np.random.RandomState(1).randint(0, 96, (2, 8)).astype(np.int32)


def test_batched_prompts_of_different_lengths_match_one_by_one(model, prompts):
    module, params, cfg = model
    batched = generate.generate(module, params, cfg, prompts, lengths=LENGTHS, max_new_tokens=6,
                                temperature=0)
    for row, n in enumerate(LENGTHS):  # each prompt alone (one compiled shape for both)
        alone = generate.generate(module, params, cfg, prompts[row:row + 1], lengths=[n],
                                  max_new_tokens=6, temperature=0)
        np.testing.assert_array_equal(batched[row], alone[0])


def test_padded_prefill_then_decode_matches_full_sequence(model, prompts):
    """Cached logits of right-padded rows equal the full-sequence logits of each row."""
    module, params, cfg = model
    nxt = np.array([[5], [7]], np.int32)
    cache = module.init_cache(cfg, 2, 32)
    prefill, cache = apply_cached(module, params, prompts, cfg, cache, lengths=LENGTHS)
    step, cache = apply_cached(module, params, nxt, cfg, cache)
    np.testing.assert_array_equal(cache.pos, LENGTHS + 1)
    for row, n in enumerate(LENGTHS):
        full = apply(module, params, np.concatenate([prompts[row:row + 1, :n], nxt[row:row + 1]], 1),
                     cfg)
        np.testing.assert_allclose(prefill[row, :n], full[0, :n], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(step[row, 0], full[0, n], atol=1e-5, rtol=1e-5)


def test_seed_determinism(gpt_model, prompts):
    module, params, cfg = gpt_model
    kwargs = dict(lengths=LENGTHS, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9)
    a = generate.generate(module, params, cfg, prompts, rng=jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(
        a, generate.generate(module, params, cfg, prompts, rng=jax.random.key(0), **kwargs))
    assert not np.array_equal(
        a, generate.generate(module, params, cfg, prompts, rng=jax.random.key(1), **kwargs))


def test_jit_parity(model, prompts):
    """``generate`` and, inside it, the model's ``init_cache`` / ``apply_cached``."""
    module, params, cfg = model
    kwargs = dict(lengths=LENGTHS, max_new_tokens=6, temperature=0)
    jitted = generate.generate(module, params, cfg, prompts, **kwargs)
    with jax.disable_jit():
        eager = generate.generate(module, params, cfg, prompts, **kwargs)
    np.testing.assert_array_equal(jitted, eager)


def test_eos_pads_and_stops(gpt_model, prompts):
    module, params, cfg = gpt_model
    greedy = np.asarray(generate.generate(module, params, cfg, prompts, lengths=LENGTHS,
                                          max_new_tokens=6, temperature=0))
    eos = int(greedy[0, 1])
    out = np.asarray(generate.generate(module, params, cfg, prompts, lengths=LENGTHS,
                                       max_new_tokens=6, temperature=0, eos_id=eos, pad_id=-1))
    for row in range(2):
        hits = np.flatnonzero(greedy[row] == eos)
        end = hits[0] + 1 if hits.size else 6
        np.testing.assert_array_equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == -1).all()


LOGITS = jnp.asarray(np.random.RandomState(2).randn(4, 96).astype(np.float32))


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=1.0, top_k=1),
                                    dict(temperature=1.0, top_p=1e-6)])
def test_sample_greedy_limits(kwargs):
    out = generate.sample(LOGITS, jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(out, jnp.argmax(LOGITS, -1))


def test_sample_support_and_jit_parity():
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.jit(jax.vmap(lambda k: generate.sample(LOGITS, k, temperature=1.5, top_k=5)))
    top5 = np.argsort(-np.asarray(LOGITS), -1)[:, :5]
    samples = np.asarray(draw(keys))
    assert all(set(samples[:, r]) <= set(top5[r]) for r in range(4))
    assert all(len(set(samples[:, r])) > 1 for r in range(4))
    probs = np.asarray(jax.nn.softmax(LOGITS, -1))
    order = np.argsort(-probs, -1)
    nucleus = [set(order[r, :np.searchsorted(np.cumsum(probs[r, order[r]]), 0.5) + 1])
               for r in range(4)]
    samples = np.asarray(jax.jit(jax.vmap(lambda k: generate.sample(LOGITS, k, top_p=0.5)))(keys))
    assert all(set(samples[:, r]) <= nucleus[r] for r in range(4))
    with jax.disable_jit():
        eager = generate.sample(LOGITS, keys[0], temperature=0.7, top_k=10, top_p=0.8)
    np.testing.assert_array_equal(
        jax.jit(lambda k: generate.sample(LOGITS, k, temperature=0.7, top_k=10, top_p=0.8))(keys[0]),
        eager)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(temperature=0.5), ValueError, "sampling with temperature=0.5 needs rng="),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0 "
                                                 r"\(0 = greedy\), got nan"),
    (dict(temperature=1.0, top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\], got nan"),
    (dict(temperature=0, top_k=0), ValueError, "top_k must be >= 1, got 0"),
    (dict(temperature=0, top_p=1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    (dict(temperature=0, lengths=[8, 0]), ValueError, r"lengths must be \(2,\) with values in \[1, 8\]"),
    (dict(temperature=0, max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
    (dict(temperature=0, max_new_tokens=25), ValueError, "max_len=33 exceeds the model's block_size=32"),
])
def test_generate_errors(gpt_model, prompts, kwargs, error, message):
    module, params, cfg = gpt_model
    with pytest.raises(error, match=message):
        generate.generate(module, params, cfg, prompts, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match=r"prompts must be a non-empty integer \(B, T\) array"):
        generate.generate(module, params, cfg, prompts[0], max_new_tokens=4, temperature=0)


def test_command_on_hugging_face_folder(hf_gpt2_folder, capsys):
    tmp_path, params, cfg = hf_gpt2_folder
    assert cfg == GPT  # so the compiled generate of the tests above is reused
    ids = list(range(1, 9))
    assert cli.generate_main([str(tmp_path), "--ids", *map(str, ids), "--max-new-tokens", "6",
                     "--temperature", "0"]) == 0
    expected = generate.generate(gpt, params, cfg, np.array([ids]), max_new_tokens=6,
                                 temperature=0, eos_id=95, pad_id=-1)
    assert capsys.readouterr().out.split() == [str(i) for i in np.asarray(expected)[0] if i >= 0]
    assert cli.generate_main([str(tmp_path), "--prompt", "hi"]) == 1
    assert "has no tokenizer: pass the prompt as --ids" in capsys.readouterr().err


def test_greedy_generate_matches_repeated_full_sequence_argmax(model, prompts):
    """The reference recomputes every step from scratch (no cache): each new token is the argmax
    of ``apply`` over the prompt and the tokens generated so far (zero-padded to one shape;
    causal attention keeps the padding out of earlier positions)."""
    module, params, cfg = model
    out = np.asarray(generate.generate(module, params, cfg, prompts, lengths=LENGTHS,
                                       max_new_tokens=6, temperature=0))
    for row, n in enumerate(LENGTHS):
        seq = np.zeros((1, 14), np.int32)
        seq[0, :n] = prompts[row, :n]
        for i in range(n, n + 6):
            seq[0, i] = np.argmax(apply(module, params, seq, cfg)[0, i - 1])
        np.testing.assert_array_equal(out[row], seq[0, n:n + 6])


@pytest.mark.parametrize("bad, index", [(96, (0, 2)), (-1, (1, 5))])
def test_out_of_vocabulary_prompts_are_refused(gpt_model, prompts, bad, index):
    module, params, cfg = gpt_model
    tokens = prompts.copy()
    tokens[index] = bad
    message = f"prompts: token id {bad} at index {index} is outside the model's vocabulary [0, 96)"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate.generate(module, params, cfg, tokens, max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"tokens: token id .* outside the model's vocabulary"):
        module.apply(params, tokens, cfg)


def test_empty_prompts_are_refused(gpt_model):
    module, params, cfg = gpt_model
    for empty in (np.zeros((0, 4), np.int32), np.zeros((2, 0), np.int32)):
        with pytest.raises(ValueError, match=r"non-empty integer \(B, T\) array, got shape"):
            generate.generate(module, params, cfg, empty, max_new_tokens=2, temperature=0)


def test_apply_cached_refuses_to_run_past_the_cache(gpt_model, prompts):
    module, params, cfg = gpt_model
    cache = module.init_cache(cfg, 2, 10)
    _, cache = apply_cached(module, params, prompts, cfg, cache, lengths=LENGTHS)  # pos 8 and 3
    _, full = apply_cached(module, params, prompts[:, :2], cfg, cache)  # pos 10 and 5
    with pytest.raises(ValueError, match="1 tokens do not fit the cache: a row already holds 10 "
                                         "of its max_len=10 positions"):
        module.apply_cached(params, prompts[:, :1], cfg, full)


def test_the_module_is_callable_as_generate(gpt_model, prompts):
    import transformax as tfx

    module, params, cfg = gpt_model
    kwargs = dict(lengths=LENGTHS, max_new_tokens=3, temperature=0)
    np.testing.assert_array_equal(tfx.generate(module, params, cfg, prompts, **kwargs),
                                  generate.generate(module, params, cfg, prompts, **kwargs))
