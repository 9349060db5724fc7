# Two commands for a newcomer: `make run` (set up + sample job offline), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test check format bench clean

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
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format pipeline tests bench
	$(BIN)/ruff check --fix pipeline tests bench

# What the journal costs: client CPU per request with and without it (a report, no assert).
bench: setup
	$(BIN)/python bench/journal.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
