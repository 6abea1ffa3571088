# One command sets everything up and runs the job: `make test`, `make demo`.
# The venv is built once and reused; torch is pinned to the CPU wheel (an unpinned torch may pull a
# multi-GB CUDA build). Override on a GPU machine: `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_glu-installed

.PHONY: install test test-compat lint demo demo-quick clean

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

# The oldest Transformers we support (the GPU image's): the model family's and every family's tests on 5.17.
COMPAT_VENV ?= .venv-tf517
COMPAT_STAMP := $(COMPAT_VENV)/.hf_glu-installed

$(COMPAT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/python -m pip install -e ".[dev,gpu]" "transformers==5.17.0"
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q \
		tests/test_configuration_glu.py tests/test_modeling_glu.py tests/test_remote_code.py tests/test_training.py \
		tests/test_families.py

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-glu demo

demo-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-glu demo --quick

clean:
	rm -rf $(VENV) $(COMPAT_VENV) hf-glu-demo .pytest_cache
