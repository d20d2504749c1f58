# convscope: two commands matter. `make demo` installs and runs the demo on the bundled
# pretrained model; `make test` installs the test extras (and chromium for the browser
# tests), runs the suite and builds the docs site strictly. Everything lives in .venv.
#
# Every pip call passes -c constraints.txt: pyproject.toml declares ranges (so installing
# convscope never replaces a user's torch), constraints.txt the exact versions CI tests.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
# pip's own chatter about this machine's extra index locations is noise, not an error
PIP := quiet_pip() { $(PY) -m pip "$$@" 2>&1 | { grep -v "is ignored" || true; }; }; quiet_pip
DEMO_OUT ?= demo-out
.PHONY: demo test test-suite docs bench lint install install-test install-bench \
  browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run pip only when pyproject.toml or constraints.txt change.
$(VENV)/.stamp-base: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	$(PY) -c "import convscope, torch, torchvision"
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(CONSTRAINTS) $(VENV)/.stamp-base
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test]"
	$(PY) -c "import pytest, fastapi, captum, pytorch_grad_cam, torchcam, playwright, mkdocs"
	touch $@

$(VENV)/.stamp-bench: pyproject.toml $(CONSTRAINTS) $(VENV)/.stamp-test
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.stamp-base
install-test: $(VENV)/.stamp-test
install-bench: $(VENV)/.stamp-bench

# Debian's chromium drives the browser tests (never `playwright install`: it downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) && echo "installed chromium"; \
	  else echo "chromium missing and not root: browser tests will be skipped"; fi; }

demo: install
	$(VENV)/bin/convscope demo --out $(DEMO_OUT)

test: test-suite docs

test-suite: install-test browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The docs site: figures and gallery generated from the bundled model, then a strict build
# (a broken link, reference or docstring fails it). Offline: no plugin fetches anything.
docs: install-test
	$(PY) scripts/gen_docs.py --out docs/generated
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site

bench: install-bench
	$(PY) benchmarks/run_all.py

lint: install-bench
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) site docs/generated dist build .pytest_cache .ruff_cache
