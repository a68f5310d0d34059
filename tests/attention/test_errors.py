"""Every documented sdpa error, with a message naming the argument, its shape and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformax as tfx

Q = np.zeros((2, 4, 8, 16), np.float32)
K = np.zeros((2, 4, 10, 16), np.float32)
V = np.zeros((2, 4, 10, 12), np.float32)


@pytest.mark.parametrize("args, kwargs, error, pattern", [
    ((Q[0, 0, 0], K, V), {}, ValueError, r"query \(shape \(16,\), dtype float32\) must have rank >= 2"),
    ((Q, K.astype(np.float16), V), {}, TypeError, r"share one dtype.*key \(shape \(2, 4, 10, 16\), dtype float16\)"),
    ((Q.astype(np.int32),) * 3, {}, TypeError, r"query \(shape \(2, 4, 8, 16\), dtype int32\) must be float32"),
    ((Q, K[..., :8], V), {}, ValueError, r"last dim \(E\) of query \(shape \(2, 4, 8, 16\).*key \(shape \(2, 4, 10, 8\)"),
    ((Q, K, V[:, :, :9]), {}, ValueError, r"sequence dim \(S\) of key \(shape \(2, 4, 10, 16\).*value \(shape \(2, 4, 9, 12\)"),
    ((Q, K[:, :3], V[:, :3]), {}, ValueError, r"batch dims of query, key and value do not broadcast: query \(2, 4\), key \(2, 3\)"),
    ((Q, K, V), {"attn_mask": np.ones((3, 10), bool)}, ValueError, r"attn_mask \(shape \(3, 10\), dtype bool\) does not broadcast to \(\.\.\., Hq, L, S\) = \(2, 4, 8, 10\)"),
    ((Q, K, V), {"attn_mask": np.ones((8, 10), np.int32)}, TypeError, r"attn_mask \(shape \(8, 10\), dtype int32\) must be bool, float32"),
    ((Q, K, V), {"attn_mask": np.ones((8, 10), bool), "is_causal": True}, ValueError, r"either attn_mask or is_causal"),
    ((Q, K, V), {"attn_mask": tfx.causal_lower_right(8, 11)}, ValueError, r"Band mask for key length S 11 but query/key give 10"),
    ((Q, K[:, :3], V[:, :3]), {"enable_gqa": True}, ValueError, r"query heads \(4\) to be a multiple of the key heads.*key \(shape \(2, 3, 10, 16\)"),
    ((Q[0, 0], K[0, 0], V[0, 0]), {"enable_gqa": True}, ValueError, r"enable_gqa needs a head dim: query \(shape \(8, 16\)"),
    ((Q, K, V), {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\); got 1.0"),
    ((Q, K, V), {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\); got -0.1"),
    ((Q, K, V), {"dropout_p": 0.1}, ValueError, r"dropout_p=0.1 needs dropout_rng"),
])
def test_bad_input_is_named(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tfx.sdpa(*args, **kwargs)


@pytest.mark.parametrize("name, message", [
    ("scale", "scale must be a Python float"), ("dropout_p", "dropout_p must be a Python float"),
    ("is_causal", "is_causal must be a Python bool"),
])
def test_traced_static_arguments_are_rejected_clearly(name, message):
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda x: tfx.sdpa(Q, K, V, **{name: x}, dropout_rng=jax.random.key(0)))(0.5)


def test_head_dim_zero_is_refused():
    with pytest.raises(ValueError, match=r"query \(shape \(2, 4, 8, 0\), dtype float32\) has "
                                         r"head dim \(E\) 0; expected >= 1"):
        tfx.sdpa(Q[..., :0], K[..., :0], V)


def test_no_kernel_error_lists_every_kernel():
    with tfx.sdpa_kernel([tfx.Backend.PALLAS_TPU, tfx.Backend.CUDNN]):
        with pytest.raises(RuntimeError) as info:
            tfx.sdpa(Q, K, V)
    message = str(info.value)
    assert "no attention kernel can run these inputs on cpu" in message
    for backend in tfx.Backend:
        assert f"  {backend.value}: " in message
    assert "excluded by sdpa_kernel" in message


def test_sdpa_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="must be tfx.Backend values"):
        with tfx.sdpa_kernel(["fastest"]):
            pass
    with pytest.raises(ValueError, match="backends is empty"):
        with tfx.sdpa_kernel([]):
            pass


def test_accepts_mask_in_query_dtype_and_f32():
    q = jnp.zeros((4, 8, 16), jnp.bfloat16)
    for dtype in (jnp.bfloat16, jnp.float32):
        assert tfx.sdpa(q, q, q, attn_mask=jnp.zeros((8, 8), dtype)).dtype == jnp.bfloat16
