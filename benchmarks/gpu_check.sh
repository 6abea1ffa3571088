#!/usr/bin/env bash
# The GPU check of the fused GLU path, for whenever a CUDA machine is available (about eight minutes, no network):
#   1. the MLP benchmark at the Llama-2-7B shape, 5 interleaved timing rounds (add --sweep by hand to time
#      every kernel launch configuration),
#   2. the GPT-2 small/medium/large/xl MLP shapes with biases, geglu_tanh then swiglu, 3 rounds, each with
#      the inference_mode forward at 1, 16, 256 and 2048 tokens (the crossover that sets
#      glu_triton.INFERENCE_EAGER_BELOW_TOKENS),
#   3. the whole training step and generation (bench_train.py: GPT-2-medium shape, auto vs eager vs dense),
#   4. the kernel tests on CUDA (tests/test_glu_triton.py without TRITON_INTERPRET: the same tests as CI).
# In that order, so that a run cut short still brings back the figures that matter most. Each step has
# its own time limit (the sum stays under nine minutes); a step that times out fails the run, the others go on.
# Run from the repository root: `bash benchmarks/gpu_check.sh`. Liger-Kernel's column needs liger-kernel
# importable; wheels in ./.whl (e.g. `pip download --no-deps liger-kernel -d .whl`) are installed first.
# Writes, per step, the markdown it prints (.md) and its JSON to $OUT when set (else ./gpu_check_out),
# with environment.txt (GPU, driver, library versions, commit) and the tests' log and JUnit XML.
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
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  git status --short 2>/dev/null | head -20
} 2>&1 | tee "$OUT/environment.txt"

status=0
bench() {  # bench <seconds> <name> <script> <args...>: markdown to $OUT/<name>.md, JSON to $OUT/<name>.json
  local seconds=$1 name=$2 script=$3
  shift 3
  timeout "$seconds" "$PY" "benchmarks/$script" "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.md" || status=1
}
bench 120 bench_llama2 bench_mlp.py --shapes llama2-7b --iters 30 --repeat 5 --inference-tokens
bench 110 bench_gpt2_geglu_tanh bench_mlp.py --shapes gpt2-geglu_tanh --iters 20 --repeat 3
bench 90 bench_gpt2_swiglu bench_mlp.py --shapes gpt2-swiglu --iters 20 --repeat 3
bench 100 bench_train bench_train.py --repeat 3
timeout 120 "$PY" -m pytest -q -p no:cacheprovider --maxfail 10 tests/test_glu_triton.py \
  --junitxml "$OUT/test_glu_triton.xml" 2>&1 | tee "$OUT/tests.log" || status=1
exit $status
