#!/usr/bin/env bash
# The GPU check of the fused GLU path, for whenever a CUDA machine is available (about five minutes, no network):
#   1. the MLP benchmark at the Llama-2-7B shape, 5 interleaved timing rounds (add --sweep by hand to time
#      every kernel launch configuration),
#   2. the same at the GPT-2 medium and small shapes,
#   3. the kernel tests on CUDA (tests/test_glu_triton.py without TRITON_INTERPRET: the same tests as CI).
# The goal-shape benchmark runs first so that a run cut short still brings back the figure that matters.
# Run from the repository root: `bash benchmarks/gpu_check.sh`. Liger-Kernel's column needs liger-kernel
# importable; wheels in ./.whl (e.g. `pip download --no-deps liger-kernel -d .whl`) are installed first.
# Writes logs, JUnit XML and the benchmark JSON to $OUT when set (else ./gpu_check_out).
# Exits non-zero if the tests or a benchmark fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the real kernels, on the GPU
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))"
} 2>&1 | tee "$OUT/environment.txt"

status=0
timeout 200 "$PY" benchmarks/bench_mlp.py --shapes llama2-7b --iters 30 --repeat 5 --json "$OUT/bench_llama2.json" 2>&1 \
  | tee "$OUT/bench_llama2.md" || status=1
timeout 150 "$PY" benchmarks/bench_mlp.py --shapes gpt2-medium gpt2-small --repeat 3 --json "$OUT/bench_gpt2.json" 2>&1 \
  | tee "$OUT/bench_gpt2.md" || status=1
timeout 200 "$PY" -m pytest -q -p no:cacheprovider --maxfail 10 tests/test_glu_triton.py \
  --junitxml "$OUT/test_glu_triton.xml" 2>&1 | tee "$OUT/tests.log" || status=1
exit $status
