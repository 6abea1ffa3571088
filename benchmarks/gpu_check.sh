#!/usr/bin/env bash
# The GPU check of the fused GLU path, for whenever a CUDA machine is available (a few minutes, no network):
#   1. the kernel tests on CUDA (tests/test_glu_triton.py without TRITON_INTERPRET: the same tests as CI),
#   2. the MLP benchmark at Llama-2-7B and GPT-2 shapes (benchmarks/bench_mlp.py).
# Run from the repository root: `bash benchmarks/gpu_check.sh`. Writes logs, JUnit XML and the benchmark
# JSON to $OUT when set (else ./gpu_check_out). Exits non-zero if the tests or the benchmark fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the real kernels, on the GPU
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/environment.txt"

status=0
timeout 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_glu_triton.py --junitxml "$OUT/test_glu_triton.xml" \
  2>&1 | tee "$OUT/tests.log" || status=1
timeout 300 "$PY" benchmarks/bench_mlp.py --json "$OUT/bench_mlp.json" 2>&1 | tee "$OUT/bench_mlp.md" || status=1
exit $status
