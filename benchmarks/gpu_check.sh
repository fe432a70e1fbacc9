#!/usr/bin/env bash
# One run on a lent GPU machine (torch with CUDA and Triton; vLLM not needed): the CUDA
# kernel suite (tests/test_kernels_cuda.py, including the CUDA-graph capture/replay of the
# whole-layer decode with another batch, and of the per-row-arm decode that full engine
# graphs capture, replayed with another batch and other arms) and the per-layer benchmark
# against the native attention call (ACT and first_token). Sized to finish in under 10
# minutes on an H100/H200 (suite ~4-5 min with compiles, benchmark ~2-3 min; not timed on a
# GPU since first_token and the per-row decode were added); each step has its own time limit
# (390 s, 180 s) so that a hang still leaves
# the other's output. Logs go to $OUT (default /tmp/act-gpu-check).
#
#     bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# Exit status: 0 when the suite passed and the benchmark ran, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/act-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

echo "== CUDA kernel suite ==" | tee "$OUT/cuda_tests.log"
timeout 390 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_kernels_cuda.py 2>&1 | tee -a "$OUT/cuda_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark ==" | tee "$OUT/bench.log"
timeout 180 "$PY" benchmarks/kernels_gpu.py --repeats 5 2>&1 | tee -a "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: exit $status (logs in $OUT)"
exit $status
