# transferline — `make demo` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   := data

.PHONY: install data demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

# The embedded default data: FractalDB-style shards + UCI digits (seconds; idempotent).
data: $(STAMP)
	$(BIN)/transferline data embedded --root $(DATA)

demo: data
	$(BIN)/transferline run configs/demo.yaml

# Two test processes: much of the suite waits on Ray start-ups and subprocesses; tests that start
# a Ray run one after another in one of them (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# Unit tests only (no Ray).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf runs $(DATA)
