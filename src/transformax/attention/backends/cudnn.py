"""cuDNN's fused flash attention, through ``jax.nn.dot_product_attention(implementation="cudnn")``.

jax.nn takes ``(B, T, N, H)`` operands, so q, k, v and the output are transposed on the way in
and out. Its log-sum-exp (``return_residual``) comes back rounded to the input dtype. jax.nn has
no separate backward, so ``backward`` re-runs the cuDNN forward under ``jax.vjp``; cuDNN's
backward ignores the gradient of the log-sum-exp, so a non-zero ``dlse`` is added by the
``xla_flash`` kernel. Rows a bool mask hides completely are set to zero afterwards (cuDNN turns
the mask into a large negative bias, which would average them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transformax.attention.backends import pallas_common as pc
from transformax.attention.backends import xla_flash
from transformax.attention.problem import Extras, Problem

NAME = "cudnn"
FEATURES = frozenset({"dense mask"})

_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def _cudnn_available() -> bool:
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return False
    return cuda_versions is not None


def reasons_unsupported(problem: Problem, platform: str) -> list[str]:
    reasons = []
    if not _cudnn_available():
        reasons.append("cuDNN is not available to this jaxlib (needs jax[cuda])")
    capability = pc.cuda_capability()
    if capability is not None and capability < (8, 0):
        reasons.append(f"cuDNN flash attention needs an sm80+ GPU (found "
                       f"sm{capability[0]}{capability[1]})")
    if problem.dtype not in _DTYPES:
        reasons.append(f"dtype {problem.dtype} is not supported (float16, bfloat16)")
    max_dim = 256 if capability is not None and capability >= (9, 0) else 128
    if problem.head_dim > max_dim or problem.head_dim % 8:
        reasons.append(f"head dim E={problem.head_dim} must be a multiple of 8 and at most "
                       f"{max_dim}" + ("" if max_dim == 256 else " (256 on sm90+)"))
    if problem.v_head_dim != problem.head_dim:
        reasons.append(f"Ev={problem.v_head_dim} != E={problem.head_dim} (jax.nn needs equal "
                       f"head dims)")
    if problem.causal_offset not in (None, 0):
        reasons.append("causal alignment other than top-left (offset "
                       f"{problem.causal_offset}): jax.nn's cuDNN path has top-left only")
    if problem.has_mask and not problem.mask_is_bool:
        reasons.append("float (additive) masks are not supported by this kernel")
    if problem.has_mask and (problem.q_len % 2 or problem.kv_len % 2):
        reasons.append(f"with a mask cuDNN needs even L and S (got L={problem.q_len}, "
                       f"S={problem.kv_len})")
    return reasons


def _btnh(x):
    return jnp.swapaxes(x, 1, 2)


def _attend(problem: Problem, q, k, v, mask):
    out, lse = jax.nn.dot_product_attention(
        _btnh(q), _btnh(k), _btnh(v), mask=mask, scale=problem.scale,
        is_causal=problem.causal_offset == 0, implementation="cudnn", return_residual=True)
    out, lse = _btnh(out), jnp.swapaxes(lse, 1, 2).astype(jnp.float32)
    if mask is not None:
        visible = jnp.broadcast_to(jnp.any(mask, axis=-1), lse.shape)
        out = jnp.where(visible[..., None], out, jnp.zeros((), out.dtype))
        lse = jnp.where(visible, lse, -jnp.inf)
    return out, lse


def forward(problem: Problem, q, k, v, extras: Extras):
    return _attend(problem, q, k, v, extras.mask)


def backward(problem: Problem, q, k, v, extras: Extras, out, lse, dout, dlse):
    _, vjp = jax.vjp(lambda q, k, v: _attend(problem, q, k, v, extras.mask)[0], q, k, v)
    grads = vjp(dout)

    def add_lse_gradient(grads):
        _, exact_lse = xla_flash.forward(problem, q, k, v, extras)
        extra = xla_flash.backward(problem, q, k, v, extras, jnp.zeros_like(out), exact_lse,
                                   jnp.zeros_like(dout), dlse)[:3]
        return tuple(g + e for g, e in zip(grads, extra))

    return (*lax.cond(jnp.any(dlse != 0), add_lse_gradient, lambda grads: grads, grads), ())
