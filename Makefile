# Two commands on a fresh machine: `make demo` (install, then train on the embedded digits task) and
# `make test` (install, then run the test suite). Both create .venv and install torch 2.13.0 (CPU) first,
# so that no other package pulls a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/flowgrove: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/flowgrove

demo: install
	$(BIN)/flowgrove train

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
