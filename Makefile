# One command sets everything up and runs the job: `make test`, `make demo`.
# The venv is built once and reused; torch is pinned to the CPU wheel (an unpinned torch may pull a
# multi-GB CUDA build). Override on a GPU machine: `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_glu-installed

.PHONY: install test lint demo demo-quick clean

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

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-glu demo

demo-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-glu demo --quick

clean:
	rm -rf $(VENV) hf-glu-demo .pytest_cache
