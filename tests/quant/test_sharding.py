"""Quantized params under a sharded ``jit`` on 8 emulated cpu devices (a subprocess): a
tensor-parallel MLP (``fc`` split by output columns, ``proj`` by input rows, the batch over
``data``) gives the unsharded output, and the int8 weights stay sharded (never gathered): with
the XLA kernels, and with the native ``cpu_int8`` and ``cpu_int4`` ones, whose FFI calls take
each device's rows and columns (their partitioning rule; the row-split ``proj`` sums partial
products, by scale group for int4)."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from transformax import nn, quant

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params = nn.gelu_mlp_init(jax.random.key(0), 64, 256, std=0.1)
    x = jax.random.normal(jax.random.key(1), (16, 8, 64))
    SPECS = {"fc": {"values": P(None, "model"), "scale": P(None, "model"), "b": P("model")},
             "proj": {"values": P("model", None), "scale": P(), "b": P()}}

    def spec(path, leaf):
        layer, field = path[0].key, getattr(path[-1], "name", getattr(path[-1], "key", None))
        return NamedSharding(mesh, SPECS[layer][field])

    run = jax.jit(nn.gelu_mlp)
    result = {"devices": len(jax.devices())}
    int4 = quant.Recipe(bits=4, weight_granularity="group", group_size=16)
    for recipe, kernel in (("int8-dynamic", "xla_int8"), ("int8-weight", "xla_int8x2"),
                           ("int8-dynamic", "cpu_int8"), ("int8-weight", "cpu_int8"),
                           (int4, "cpu_int4")):
        qparams = quant.quantize(params, recipe)
        with quant.kernel([kernel]):
            one = np.asarray(run(qparams, x))
            sharded_params = jax.device_put(
                qparams, jax.tree_util.tree_map_with_path(spec, qparams))
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            out = run(sharded_params, xs)
            hlo = run.lower(sharded_params, xs).compile().as_text()
        result[f"{'int4' if recipe is int4 else recipe} {kernel}"] = {
            "max_abs_diff": float(np.abs(np.asarray(out) - one).max()),
            "scale": float(np.abs(one).max()),
            "out_spec": [str(s) for s in out.sharding.spec],
            "fc_shard": list(sharded_params["fc"]["w"].values.addressable_shards[0].data.shape),
            "gathered_s8": bool(re.search(r"= s8\\[[\\d,]*\\]\\S* all-gather", hlo)),
            "native": re.findall(r"= (\\w+\\[[\\d,]+\\]).* custom-call\\(.*tfx_cpu_int", hlo),
        }
    print(json.dumps(result))
""")


def test_sharded_jit_matches_unsharded():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("devices") == 8
    assert len(result) == 5
    for name, r in result.items():
        # Integer products are exact and the float epilogue rounds alike, except that the two
        # programs may round an activation's low digit differently in xla_int8x2 (each within
        # its 2^-16 of the token's largest value; see test_kernels.error_bound).
        tol = 1e-4 if name.endswith("xla_int8x2") else 1e-6
        assert r["max_abs_diff"] <= tol * r["scale"], (name, r)
        packed = 2 if name == "int4 cpu_int4" else 1  # two int4 input rows a byte
        assert r["out_spec"][0] == "data" and r["fc_shard"] == [64 // packed, 64], (name, r)
        # fc: 64 of 128 rows by 64 of 256 columns; proj: 64 rows by all 64 columns, of 64
        # inputs (cpu_int4: 4 of 16 scale groups), partial products summed.
        native = ["s32[64,64]"] * 2 if "dynamic" in name else ["f32[64,64]"] * 2
        assert r["native"] == (native if "cpu_" in name else []), (name, r)
        assert not r["gathered_s8"], name
