"""PyTorch's own SDPA as the reference: outputs and gradients on the same inputs."""

import numpy as np
import torch


def torch_sdpa(q, k, v, cotangent, attn_mask=None, **kwargs):
    """Returns torch's output and (dq, dk, dv[, dmask]) as float64 numpy arrays."""
    tensors = [torch.tensor(np.asarray(x, np.float32), requires_grad=True) for x in (q, k, v)]
    mask = None
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        mask = torch.tensor(attn_mask)
        if attn_mask.dtype != bool:
            mask = mask.float().requires_grad_(True)
    out = torch.nn.functional.scaled_dot_product_attention(*tensors, attn_mask=mask, **kwargs)
    out.backward(torch.tensor(np.asarray(cotangent, np.float32)))
    grads = [t.grad.double().numpy() for t in tensors]
    if mask is not None and mask.requires_grad:
        grads.append(mask.grad.double().numpy())
    return out.detach().double().numpy(), grads
