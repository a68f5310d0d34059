#!/usr/bin/env bash
# The GPU check, in one go (fits one 10-minute device command): the `gpu` tests, the interpret-
# mode and lowering tests (on the CPU), then the GPU attention benchmark (bf16, B*S = 16384,
# 16 heads, hd 128/64, S 512..16384, full/causal, fwd and fwd+bwd: Pallas Triton, cuDNN, XLA;
# the same as `scripts/bench_attention.py --gpu`).
#
#   scripts/device_check.sh [all|tests|bench]     # default: all (stage timeouts sum to 570 s;
#                                               # run tests and bench separately for headroom)
#
# Environment: OUT (where the benchmark writes JSON/PNG; default bench_out), BENCH_BUDGET
# (seconds after which the benchmark starts no new shape; default 160). Exits non-zero when a
# test stage fails; the benchmark still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device image has jax; no install
stage="${1:-all}"
out="${OUT:-bench_out}"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

if [[ "$stage" == all || "$stage" == tests ]]; then
  echo "== gpu tests"
  timeout 210 python -m pytest -q -m gpu tests/attention/test_pallas.py \
    tests/attention/test_cudnn.py || status=1
  echo "== interpret-mode and lowering tests (cpu)"
  JAX_PLATFORMS=cpu timeout 120 python -m pytest -q tests/attention/test_pallas.py \
    tests/attention/test_lowering.py tests/attention/test_cudnn.py || status=1
fi

if [[ "$stage" == all || "$stage" == bench ]]; then
  echo "== benchmark"
  timeout 240 python scripts/bench_attention_gpu.py --out "$out" \
    --budget "${BENCH_BUDGET:-160}" || status=1
fi
exit "$status"
