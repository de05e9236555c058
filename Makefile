# itm front door: `make train` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itm-installed
# CPU-only machines get this torch (no multi-GB CUDA packages); set TORCH_INDEX to a CPU wheel
# index (e.g. https://download.pytorch.org/whl/cpu) where no local CPU build is configured.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-all test-min bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing the default (CUDA) torch build"; \
	  $(PY) -m pip install -q "torch>=2.4"; \
	else \
	  echo "no GPU: installing the CPU torch build ($(TORCH_SPEC))"; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: install
	$(PY) train.py experiment=quickstart $(ARGS)

# Fast suite: tests marked `slow` are skipped locally (`make test-all` runs them too) and run in
# CI (CI=true), whose budget allows their extra ~1 minute.
TEST_MARKERS := $(if $(filter true 1,$(CI)),,-m "not slow")
test: install
	$(PY) -m pytest -q $(TEST_MARKERS) $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Benchmarks (bench/bench_*.py): ratios measured side by side in one run. BENCH="scoring data"
# picks some.
BENCH ?=
bench: install
	$(PY) bench/run.py $(BENCH)

# ruff (lint + format check) and mypy (the level set in pyproject.toml [tool.mypy])
lint: install
	$(PY) -m ruff check src tests bench *.py
	$(PY) -m ruff format --check src tests bench *.py
	$(PY) -m mypy

# The declared lower bounds (pyproject.toml) installed in $(MIN_VENV), then the fast tests on them.
# torch stays this machine's build ($(TORCH_SPEC)): its bound (2.4) is not installed here.
MIN_VENV ?= .venv-min
MIN_PINS := lightning==2.6.0 hydra-core==1.3.2 omegaconf==2.3.0 torchmetrics==1.3.1 \
  wandb==0.17.0 transformers==5.3.0 h5py==3.10.0 numpy==1.26.0 PyYAML==6.0.1 rich==13.0.0 \
  matplotlib==3.8.0
test-min:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(MIN_VENV)/bin/python -m pip install -q -e ".[dev]" $(MIN_PINS)
	$(MIN_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|lightning|hydra-core|omegaconf|torchmetrics|wandb|transformers|h5py|numpy|pyyaml|rich|matplotlib) "
	$(MIN_VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

format: install
	$(PY) -m ruff format src tests bench *.py
	$(PY) -m ruff check --fix src tests bench *.py

clean:
	rm -rf outputs multirun wandb .pytest_cache .ruff_cache .mypy_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
