"""quantize / dequantize: round-trip bounds, edge cases, recipes, errors, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from transformax import nn, quant

K, N = 64, 48
INT4 = quant.Recipe(bits=4, weight_granularity="group", group_size=16)


def layer(seed=0, k=K, n=N):
    w = np.random.RandomState(seed).standard_normal((k, n)).astype(np.float32)
    return {"w": jnp.asarray(w), "b": jnp.zeros((n,), jnp.float32)}


def qw_of(params, recipe="int8-weight"):
    return quant.quantize(params, recipe)["w"]


@pytest.mark.parametrize("granularity", ["channel", "tensor", "group"])
def test_round_trip_within_half_a_step(granularity):
    params = layer()
    qw = qw_of(params, quant.Recipe(weight_granularity=granularity, group_size=16))
    w = np.asarray(params["w"])
    blocks = {"channel": (1, K), "tensor": (1, K), "group": (K // 16, 16)}[granularity]
    wg = w.reshape(blocks[0], blocks[1], N)
    amax = np.abs(wg).max(axis=(1, 2) if granularity == "tensor" else 1, keepdims=True)
    step = amax / 127  # an independent formula for each channel's / group's scale
    err = np.abs(np.asarray(quant.dequantize({"w": qw})["w"]) - w).reshape(wg.shape)
    assert np.all(err <= step / 2 * (1 + 1e-6))
    assert np.abs(np.asarray(qw.values)).max() == 127
    assert qw.values.dtype == jnp.int8 and qw.granularity == granularity


def test_int4_two_values_a_byte():
    """Packed int4 against NumPy: symmetric [-7, 7] per group of 16 rows, row 2i in the low
    nibble of byte i, row 2i + 1 in the high one; within half a step of the weight."""
    params = layer(3)
    qw = qw_of(params, INT4)
    w = np.asarray(params["w"]).reshape(K // 16, 16, N)
    step = np.abs(w).max(1, keepdims=True) / 7
    expected = np.clip(np.round(w / step), -7, 7).reshape(K, N)
    packed = np.asarray(qw.values)
    assert packed.dtype == np.int8 and packed.shape == (K // 2, N) and qw.shape == (K, N)
    low, high = ((packed & 0xF) ^ 8) - 8, packed >> 4
    np.testing.assert_array_equal(np.stack([low, high], 1).reshape(K, N), expected)
    err = np.abs(np.asarray(qw.dequantize()) - np.asarray(params["w"])).reshape(w.shape)
    assert np.all(err <= step / 2 * (1 + 1e-6))


def test_values_match_torch_per_channel_quantization():
    params = layer(1)
    qw = qw_of(params)
    scale = torch.from_numpy(np.asarray(qw.scale[0], np.float64))
    ref = torch.quantize_per_channel(torch.from_numpy(np.array(params["w"])), scale,
                                     torch.zeros(N, dtype=torch.long), 1, torch.qint8)
    np.testing.assert_array_equal(np.asarray(qw.values), ref.int_repr().numpy())


def test_zero_rows_and_columns_and_an_outlier():
    w = np.random.RandomState(2).standard_normal((K, N)).astype(np.float32)
    w[:, 3] = 0.0   # an all-zero output channel
    w[5, :] = 0.0   # an all-zero input row
    w[7, 9] = 1e4   # one huge outlier
    qw = qw_of({"w": jnp.asarray(w)})
    deq = np.asarray(qw.dequantize())
    assert np.all(np.isfinite(deq)) and np.all(deq[:, 3] == 0) and np.all(deq[5] == 0)
    assert deq[7, 9] == pytest.approx(1e4)
    others = np.delete(np.arange(N), 9)  # per-channel scales keep the outlier in its channel
    np.testing.assert_allclose(deq[:, others], w[:, others], atol=np.abs(w).max() / 254)
    x = jnp.asarray(np.random.RandomState(3).standard_normal((4, K)), jnp.float32)
    y = np.asarray(nn.linear(quant.quantize({"w": jnp.asarray(w)}, "int8-dynamic"), x))
    assert np.all(np.isfinite(y)) and np.all(y[:, 3] == 0)


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int8-weight"])
def test_zero_activations_give_zero(recipe):
    qparams = quant.quantize(layer(), recipe)
    np.testing.assert_array_equal(nn.linear(qparams, jnp.zeros((2, K))), np.zeros((2, N)))


def test_any_pytree_skip_and_layers():
    params = {"blocks": [{"fc": layer(0), "proj": layer(1, N, K)} for _ in range(2)],
              "norm": {"scale": jnp.ones(K)}, "head": {"w": layer(2)["w"]}}
    q = quant.quantize(params, quant.Recipe(layers=("blocks.*",)), skip=["*.1.proj"])
    quantized = {p for p, x in zip(
        ["blocks.0.fc", "blocks.0.proj", "blocks.1.fc", "blocks.1.proj", "head"],
        [q["blocks"][0]["fc"], q["blocks"][0]["proj"], q["blocks"][1]["fc"],
         q["blocks"][1]["proj"], q["head"]]) if isinstance(x["w"], quant.QuantizedWeight)}
    assert quantized == {"blocks.0.fc", "blocks.0.proj", "blocks.1.fc"}
    assert q["blocks"][0]["fc"]["w"].name == "blocks.0.fc"
    np.testing.assert_array_equal(q["norm"]["scale"], params["norm"]["scale"])
    back = quant.dequantize(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    bare = quant.quantize([layer(0), layer(1)], "int8-dynamic")  # a bare list of layers
    assert [x["w"].name for x in bare] == ["0", "1"]


@pytest.mark.parametrize("recipe", ["int8-dynamic", INT4])
def test_quantize_jit_matches_eager(recipe):
    params = layer(4)
    a = jax.jit(lambda p: quant.quantize(p, recipe))(params)
    with jax.disable_jit():
        b = quant.quantize(params, recipe)
        b_back = quant.dequantize(b)["w"]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(jax.jit(quant.dequantize)(a)["w"], b_back)


def test_pytree_node_under_vmap():
    stacked = jax.jit(jax.vmap(lambda w: quant.quantize({"w": w}, "int8-dynamic")))(
        jnp.stack([layer(0)["w"], layer(1)["w"]]))
    assert stacked["w"].values.shape == (2, K, N)
    x = jnp.asarray(np.random.RandomState(5).standard_normal((2, 3, K)), jnp.float32)
    y = jax.jit(jax.vmap(nn.linear))(stacked, x)
    for i in range(2):
        one = jax.tree.map(lambda a, i=i: a[i], stacked)
        np.testing.assert_allclose(y[i], nn.linear(one, x[i]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recipe, message", [
    ("int4-magic", "unknown recipe 'int4-magic'"),
    (3, "unknown recipe 3"),
])
def test_bad_recipe_names(recipe, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(layer(), recipe)


@pytest.mark.parametrize("kwargs, message", [
    ({"activations": "sometimes"}, "activations='sometimes'"),
    ({"weight_granularity": "row"}, "weight_granularity='row'"),
    ({"observer": "mean"}, "observer='mean'"),
    ({"activations": "static", "act_granularity": "token"}, "act_granularity='token'"),
    ({"group_size": 0}, "group_size=0"),
    ({"percentile": 20.0}, "percentile=20.0"),
    ({"bits": 3}, "bits=3"),
    ({"bits": 4, "activations": "dynamic"}, "bits=4: int4 weights are weight-only"),
    ({"bits": 4, "embeddings": ("wte",)}, "embedding tables are int8"),
])
def test_bad_recipe_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.Recipe(**kwargs)


def test_bad_patterns():
    params = {"fc": layer()}
    with pytest.raises(ValueError, match=r"skip pattern 'blocks\.\*' matches no linear layer; "
                                         r"the candidates are: fc"):
        quant.quantize(params, "int8-weight", skip=["blocks.*"])
    with pytest.raises(TypeError, match="skip must be a sequence of glob patterns"):
        quant.quantize(params, "int8-weight", skip="fc")
    with pytest.raises(ValueError, match="Recipe layers pattern 'mlp' matches no linear layer"):
        quant.quantize(params, quant.Recipe(layers=("mlp",)))


def test_unsupported_weights_name_the_layer():
    with pytest.raises(ValueError, match=r"layer 'a\.fc': int8 needs a floating-point 2-D "
                                         r"\(in, out\) weight, got shape \(2, 3, 4\)"):
        quant.quantize({"a": {"fc": {"w": jnp.zeros((2, 3, 4))}}}, "int8-weight")
    with pytest.raises(ValueError, match=r"layer 'fc'.*dtype int32"):
        quant.quantize({"fc": {"w": jnp.zeros((4, 4), jnp.int32)}}, "int8-weight")
    with pytest.raises(ValueError, match=r"layer 'fc': group_size=48 does not divide its 64 "
                                         r"input features"):
        quant.quantize({"fc": layer()}, quant.Recipe(weight_granularity="group", group_size=48))
    with pytest.raises(ValueError, match=r"layer 'fc': int4 packs two input rows per byte, so "
                                         r"it needs an even number of input features"):
        quant.quantize({"fc": layer(k=5)}, quant.Recipe(bits=4))
    with pytest.raises(ValueError, match="layer 'fc' is already quantized"):
        quant.quantize(quant.quantize({"fc": layer()}, "int8-weight"), "int8-weight")
    with pytest.raises(ValueError, match="params has no nn.linear layers"):
        quant.quantize({"scale": jnp.ones(3)}, "int8-weight")


def test_bad_inputs_at_run_time_name_the_layer():
    qparams = quant.quantize({"fc": layer()}, "int8-dynamic")["fc"]
    with pytest.raises(ValueError, match=r"quantized linear 'fc': x has shape \(2, 5\), its last "
                                         r"axis must match the weight's 64 input features"):
        nn.linear(qparams, jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match="quantized linear 'fc': x must be floating point"):
        nn.linear(qparams, jnp.zeros((2, K), jnp.int32))


def test_embedding_table_quantized_per_row():
    table = np.random.RandomState(6).standard_normal((20, K)).astype(np.float32)
    table[4] = 0.0
    params = {"wte": jnp.asarray(table), "fc": layer()}
    q = quant.quantize(params, quant.Recipe(activations="dynamic", embeddings=("wte",)))
    qt = q["wte"]
    assert isinstance(qt, quant.QuantizedTable) and qt.shape == (20, K)
    step = np.abs(table).max(1, keepdims=True) / 127
    deq = np.asarray(quant.dequantize(q)["wte"])
    assert np.all(np.abs(deq - table) <= step / 2 * (1 + 1e-6)) and np.all(deq[4] == 0)
    ids = jnp.asarray([[3, 4], [19, 0]])
    np.testing.assert_array_equal(nn.embed(qt, ids), deq[np.asarray(ids)])
    x = jnp.asarray(np.random.RandomState(7).standard_normal((3, K)), jnp.float32)
    xq = np.clip(np.round(np.asarray(x) / (np.abs(x).max(1, keepdims=True) / 127)), -127, 127)
    ref = (xq * np.abs(x).max(1, keepdims=True) / 127) @ deq.T  # per-token int8 activations
    np.testing.assert_allclose(jax.jit(nn.unembed)(qt, x), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="Recipe embeddings pattern 'emb' matches no embedding "
                                         "table; the candidates are: wte"):
        quant.quantize(params, quant.Recipe(embeddings=("emb",)))
    with pytest.raises(ValueError, match="embedding table 'wte' is already quantized"):
        quant.quantize(q, quant.Recipe(embeddings=("wte",)), skip=["fc"])
    with pytest.raises(ValueError, match="Recipe embeddings: .* not 'static'"):
        quant.Recipe(activations="static", embeddings=("wte",))
