# Two entry points (see README): `make repro` runs the tiny pipeline end to end,
# `make test` runs the test suite. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# requirements.lock pins torch==2.13.0: a CPU build where one is available locally,
	# the normal build elsewhere; never an unpinned (multi-GB CUDA) resolution.
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $@

.PHONY: install repro test
install: $(BIN)/.installed

repro: $(BIN)/.installed
	dvc repro

test: $(BIN)/.installed
	pytest

# CI's reproduction check: regenerate the tiny default from nothing, compare with the committed metrics.
.PHONY: reproduce-check
reproduce-check: $(BIN)/.installed
	dvc repro
	python -m poststate.reproduction
