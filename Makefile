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
# --no-compile: pip would byte-compile every module of torch, scipy, monai, ... (about 45 s on
# 2 cores, BENCHMARKS.md); Python compiles the few the demo imports on first use instead.
PIP := $(BIN)/python -m pip install --quiet --no-compile

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $(STAMP)

# The test suite starts Python many times (the CLI tests run it in subprocesses): compile
# everything once, so that none of them compiles again where bytecode is not cached. As with
# pip's own compiling, a file written for a newer Python (torch ships one) stays uncompiled.
$(TESTED): $(STAMP)
	$(PIP) -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(TESTED)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unpersonal run --preset demo --out runs/demo

test: $(TESTED)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs/demo
