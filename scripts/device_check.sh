#!/usr/bin/env bash
# The GPU check, within one 10-minute device command (<= 420 s of stages): the `gpu` tests, then
# the GPU attention benchmark (bf16, B*S = 16384, 16 heads, hd 128/64, full/causal, fwd and
# fwd+bwd): Pallas Triton and cuDNN longest sequences first (16384..512), XLA's O(S^2) path only
# up to S = 4096. CPU-only checks (interpret mode, lowering) belong to the ordinary test run.
#
#   scripts/device_check.sh [all|tests|bench]     # default: all
#
# Runs on the GPU only (JAX_PLATFORMS=cuda; it stops at once if jax does not see a GPU).
# Everything it prints is unbuffered and also appended to $OUT/device_check.log (default OUT:
# device_check_out); pytest writes $OUT/junit_gpu.xml, the benchmarks JSON/PNG under
# $OUT/bench_*. A failing or timed-out stage is recorded in $OUT/stages.txt and the next stage
# still runs; the exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device image has jax; no install
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
stage="${1:-all}"
out="${OUT:-device_check_out}"
mkdir -p "$out"
log="$out/device_check.log"
: > "$out/stages.txt"
status=0

# run NAME SECONDS CMD...: one stage under a timeout (SIGINT first, so pytest still writes its
# report), its output teed into the log, its result recorded.
run() {
  local name="$1" seconds="$2"; shift 2
  echo "== $name (timeout ${seconds}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout -s INT -k 10 "$seconds" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local result="ok"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    result="TIMEOUT"
  elif [[ $rc -ne 0 ]]; then
    result="FAILED (exit $rc)"
  fi
  [[ "$result" == ok ]] || status=1
  echo "$name: $result in $((SECONDS - start)) s" | tee -a "$log" "$out/stages.txt"
}

timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
  | tee -a "$log"
run "gpu in use" 20 python3 -c "
import jax
print('jax', jax.__version__, jax.devices())
assert jax.default_backend() == 'gpu', f'jax runs on {jax.default_backend()}, not a GPU'"
if [[ $status -ne 0 ]]; then
  echo "no GPU in use: nothing checked" | tee -a "$log"
  exit 1
fi

if [[ "$stage" == all || "$stage" == tests ]]; then
  run "gpu tests" 180 python3 -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml="$out/junit_gpu.xml" tests/attention/test_pallas.py tests/attention/test_cudnn.py
fi

if [[ "$stage" == all || "$stage" == bench ]]; then
  run "benchmark: pallas_triton, cudnn" 150 python3 scripts/bench_attention_gpu.py \
    --impls pallas_triton cudnn --lengths 16384 8192 2048 512 --budget 110 \
    --out "$out/bench_flash"
  run "benchmark: xla (S <= 4096)" 60 python3 scripts/bench_attention_gpu.py \
    --impls xla --lengths 4096 2048 512 --budget 30 --out "$out/bench_xla"
fi

echo "== stages" | tee -a "$log"
cat "$out/stages.txt"
exit "$status"
