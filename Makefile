# fromzero: two commands on a fresh machine.
#   make demo   creates .venv if missing, installs, prepares Shakespeare, pretrains a char GPT, samples
#   make test   creates .venv if missing, installs, runs the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fromzero-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-install only when the project metadata changes: a no-op when already done.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m fromzero.demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/pretrain.py
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
