# The front door: `make run` serves the demo table, `make test` runs lint and the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0 is pinned so a fresh machine takes the CPU build from local disk
# instead of a multi-GB CUDA download; see constraints.txt.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: help venv run test lint format proto clean

help:
	@echo "make run     start the server on the seeded demo table (gRPC :50051, metrics :8000)"
	@echo "make test    lint (ruff, mypy) and run the test suite"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make format  ruff format and ruff check --fix"
	@echo "make proto   regenerate client/embedding_client/proto from protos/"
	@echo "make clean   remove .venv and caches"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[server,dev]'
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/embedding-server $(ARGS)

test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
