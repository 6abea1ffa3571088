#!/usr/bin/env bash
# The GPU check of the fused GLU path, for whenever a CUDA machine is available (under eight minutes, no network).
# Steps, in order of what matters most (a run cut short still brings back the first ones), each with its own
# time limit in seconds (STEP_SECONDS below; the sum, 475 s, is printed first and stays under 8 minutes, so
# one 10-minute device call holds the whole check with time to start and to bring results back):
#   setup   15  wheels from ./.whl installed into a temporary folder, environment.txt
#   llama   85  bench_mlp.py at the Llama-2-7B shape, 5 interleaved timing rounds (eager, LlamaMLP,
#               torch.compile, Liger's LigerSwiGLUMLP and GEMM-fused LigerMLP, fused, and the packed gate|up
#               designs fused[packed], fused[packed_interleaved]); add --sweep by hand
#   geglu   80  the four GPT-2 MLP shapes with biases, geglu_tanh, 3 rounds, every fused design of
#               glu_triton.MLP_DESIGNS (the "Fused designs" table picks the fastest per shape), with the
#               inference_mode forward at 1, 16, 256 and 2048 tokens (the crossover that sets
#               glu_triton.INFERENCE_EAGER_BELOW_TOKENS)
#   swiglu  55  the same shapes with swiglu, every design, without the inference table
#   profile 55  torch.profiler per-kernel times of one fwd+bwd step at gpt2-small and gpt2-medium, both
#               variants: every fused design, Liger, LlamaMLP, torch.compile, the GEMMs alone
#   train   65  bench_train.py: the whole training step and generation (GPT-2-medium shape, auto vs eager vs
#               dense), 2 rounds
#   tests   120 tests/kernels/test_glu_triton.py without TRITON_INTERPRET: the same tests as CI, on the GPU (93 s last
#               measured on an H100 with 95 tests; 230 now, the new ones tiny)
# The limits are estimates until a run prints "step X took N s": set them from those lines.
# A step that fails or times out marks the run failed; the others still run. Inside the benchmarks each
# implementation is guarded (its failure is that row's note) and each shape's rows are appended to
# $OUT/<step>.rows.jsonl as soon as they are measured, so a step killed by its limit keeps what it measured.
# Run from the repository root: `bash benchmarks/gpu_check.sh`; through the device tool (which sets $OUT and
# brings it back): run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600). Liger-Kernel's columns need liger-kernel
# importable: wheels in ./.whl (e.g. `pip download --no-deps liger-kernel -d .whl`) are installed first.
# ./.whl is git-ignored: a device run that copies the working tree must carry it explicitly (carry: [".whl"]).
# Writes, per step, the markdown it prints (.md), its JSON and rows to $OUT when set (else ./gpu_check_out),
# with environment.txt (GPU, driver, library versions, commit) and the tests' log and JUnit XML.
# Exits non-zero if the tests or a benchmark fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the real kernels, on the GPU
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
declare -A STEP_SECONDS=([setup]=15 [llama]=85 [geglu]=80 [swiglu]=55 [profile]=55 [train]=65 [tests]=120)
total=0
for s in "${STEP_SECONDS[@]}"; do total=$((total + s)); done
echo "gpu_check: time budget $total s in all (setup ${STEP_SECONDS[setup]}, llama ${STEP_SECONDS[llama]}," \
  "geglu ${STEP_SECONDS[geglu]}, swiglu ${STEP_SECONDS[swiglu]}, profile ${STEP_SECONDS[profile]}," \
  "train ${STEP_SECONDS[train]}, tests ${STEP_SECONDS[tests]})"
started=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
  timeout "${STEP_SECONDS[setup]}" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" - <<'PYTHON'
import importlib.metadata as m

for name in ("peft", "accelerate", "pytest", "hypothesis", "liger-kernel"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
PYTHON
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  git status --short 2>/dev/null | head -20
} 2>&1 | tee "$OUT/environment.txt"

status=0
bench() {  # bench <step> <name> <script> <args...>: markdown to $OUT/<name>.md, JSON (+ .rows.jsonl) to $OUT/<name>.json
  local step=$1 name=$2 script=$3 begin=$SECONDS
  shift 3
  timeout "${STEP_SECONDS[$step]}" "$PY" "benchmarks/$script" "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.md" \
    || { status=1; echo "gpu_check: step $step ($name) failed or ran past ${STEP_SECONDS[$step]} s"; }
  echo "gpu_check: step $step took $((SECONDS - begin)) s of ${STEP_SECONDS[$step]}"
}
# Without biases the *_torch_bias designs are the same code as their kernel-sum twins: only the packings run.
bench llama bench_llama2 bench_mlp.py --shapes llama2-7b --iters 30 --repeat 5 --inference-tokens \
  --designs packed packed_interleaved
bench geglu bench_gpt2_geglu_tanh bench_mlp.py --shapes gpt2-geglu_tanh --iters 20 --repeat 3
bench swiglu bench_gpt2_swiglu bench_mlp.py --shapes gpt2-swiglu --iters 20 --repeat 3 --inference-tokens
bench profile bench_profile bench_mlp.py --profile 5 --shapes gpt2-small-geglu_tanh gpt2-medium-geglu_tanh \
  gpt2-small-swiglu gpt2-medium-swiglu
bench train bench_train bench_train.py --repeat 2
begin=$SECONDS
timeout "${STEP_SECONDS[tests]}" "$PY" -m pytest -q -p no:cacheprovider --maxfail 10 tests/kernels/test_glu_triton.py \
  --junitxml "$OUT/test_glu_triton.xml" 2>&1 | tee "$OUT/tests.log" || status=1
echo "gpu_check: step tests took $((SECONDS - begin)) s of ${STEP_SECONDS[tests]}; all steps $((SECONDS - started)) s"
exit $status
