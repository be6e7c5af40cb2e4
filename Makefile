# The two commands a newcomer runs: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo2025 test test-slow lint clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel on disk: a bare `torch` requirement would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,nnunet]' torch==2.13.0
	# PyPI's torchvision is built for CUDA torch ("operator torchvision::nms does not exist" on the CPU wheel);
	# nnU-Net's predictor and planner do not need it, timm (pulled by dynamic-network-architectures) stays unimported
	$(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

demo: setup
	WANDB_MODE=offline $(PY) -m aeval.grid experiment=demo

demo2025: setup  # the 2025 edition's grid (6 training x 7 test sets, ten organs) on the synthetic A-Eval-mini
	WANDB_MODE=offline $(PY) -m aeval.grid experiment=aeval2025_demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup  # ruff, and pylint's copy detector over the package (issue 17's bar: nothing reported)
	$(VENV)/bin/ruff check .
	$(PY) -m pylint --disable=all --enable=duplicate-code --min-similarity-lines=6 aeval

clean:
	rm -rf outputs multirun .pytest_cache build
