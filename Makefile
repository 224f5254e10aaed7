# fromzero: two commands on a fresh machine.
#   make demo   creates .venv if missing, installs, prepares Shakespeare, pretrains a char GPT, samples
#   make test   creates .venv if missing, installs, runs the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fromzero-installed

.PHONY: setup demo test bench clean clean-all

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
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=15

bench: setup
	$(BIN)/python benchmarks/pretrain.py
	$(BIN)/python benchmarks/generate.py

# clean: what `make` itself built (the venv, build files); runs/, data/ and the download cache stay.
clean:
	@echo "removing the virtual environment and build files: $(VENV) build src/*.egg-info .pytest_cache"
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
	@echo "kept: runs/ (your runs), data/ (prepared data), $${FROMZERO_HOME:-~/.cache/fromzero} (downloads); make clean-all removes runs/ and data/ too"

# clean-all: also the runs and prepared data in this checkout (the download cache stays: it is shared).
clean-all: clean
	@echo "removing runs/ and data/"
	rm -rf runs data
