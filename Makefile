# The README's two set-up commands are `make demo` and `make test`; the rest are helpers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Served from the build machines' local cache; on a Deep Learning AMI torch is already
# there and is kept (the install step only adds it when `import torch` fails).
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= demo-data

.PHONY: demo test install install-dev lint clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	touch $@

# With the serve and tune extras: the README's quickstart goes on to `ec2train serve` and `ec2train tune`.
# Makefile is a prerequisite: a checkout that changes what is installed reinstalls on the next make.
$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.torch
	$(BIN)/pip install -q -e '.[serve,tune]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml Makefile $(VENV)/.torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make demo: install (with the serve and tune extras), generate the demo data set, train 5 epochs on the CPU
demo: install
	$(BIN)/ec2train data demo $(DEMO_DATA)
	$(BIN)/ec2train fit --data $(DEMO_DATA) --epochs 5 --arch resnet18 --weights none --image-size 64 --batch-size 32 --resume auto

## make test: install with the dev extra and run the test suite (CPU, loopback only) on 4
## pytest-xdist workers (more than 2 cores: most tests wait on subprocesses and servers),
## a file at a time, so module fixtures (a torchrun cluster, a served model) are built once;
## files in conftest.py's order (slowest first), not xdist's (most tests first).
## One file alone, once `make install-dev` (or `make test`) has installed the dev extra:
##   $(BIN)/python -m pytest -q tests/test_fit.py
test: install-dev
	$(BIN)/python -m pytest -q -n 4 --dist loadfile --no-loadscope-reorder

## make lint: ruff (lint + format check) on the code, tests, benchmarks and scripts; mypy on
## ec2train/ (settings in pyproject.toml); shellcheck on infra/
lint: install-dev
	$(BIN)/ruff check ec2train tests bench scripts
	$(BIN)/ruff format --check ec2train tests bench scripts
	$(BIN)/mypy
	$(BIN)/shellcheck infra/*.sh

## make bench: the benchmarks in bench/ (each prints ratios against a baseline run alongside; ~15 min on 2 cores)
bench: install-dev
	for b in bench_decode bench_prepare bench_cache_features bench_vs_script ddp_bench serve_bench; do \
		$(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DATA) TrainedModels runs .pytest_cache .mypy_cache
