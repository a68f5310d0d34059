"""Attention kernels. Each module exposes ``reasons_unsupported(problem, platform)``,
``forward(problem, q, k, v, mask, seed) -> (out, lse)`` and
``backward(problem, q, k, v, mask, seed, out, lse, dout, dlse) -> (dq, dk, dv)`` on the
canonical operands described in ``transformax.attention.problem``."""
