# `make demo` and `make test` work on a fresh machine: the first call creates .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTED := $(VENV)/.installed-test

.PHONY: demo test install clean

# Reinstall when the dependency list changes. torch is installed first, alone and pinned, so pip
# takes the local CPU wheel instead of resolving a CUDA build for the rest. The demo needs the
# package alone; the test extras (diffusers, datasets, mlcroissant, ...) come with `make test`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TESTED): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TESTED)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unpersonal run --preset demo --out runs/demo

test: $(TESTED)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs/demo
