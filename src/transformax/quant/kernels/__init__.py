"""Int8 matmul kernels. Each module exposes ``reasons_unsupported(problem, platform)``
(empty = can run) and ``matmul(problem, x, qw) -> float32 (M, N)`` for ``x (M, K)``, before
the bias."""
