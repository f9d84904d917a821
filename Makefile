# Set-up on a fresh machine: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; an unpinned `torch` may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all bench lint install install-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/daguerre generate "a red circle above a blue square" --seed 1 --out demo.png
	@echo "wrote demo.png"

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests bench

bench: $(VENV)/.installed-test
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
