# Two commands for a newcomer: `make run` (set up + sample job offline), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test check format clean

setup: $(VENV)/.installed

# Reinstall only when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: setup
	$(BIN)/pipeline run jobs/summarise.toml --simulate

check: setup
	$(BIN)/ruff format --check pipeline tests
	$(BIN)/ruff check pipeline tests
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format pipeline tests
	$(BIN)/ruff check --fix pipeline tests

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
