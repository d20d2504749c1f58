# convscope: two commands matter. `make demo` installs and runs the demo on the bundled
# pretrained model; `make test` installs the test extras (and chromium for the browser
# tests) and runs the suite. Everything lives in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo-out

.PHONY: demo test bench lint install install-test install-bench browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run pip only when pyproject.toml changes.
$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PIP) install -q -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import convscope, torch, torchvision"
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import pytest, fastapi, captum, pytorch_grad_cam, torchcam, playwright"
	touch $@

$(VENV)/.stamp-bench: pyproject.toml $(VENV)/.stamp-test
	$(PIP) install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
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

test: install-test browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-bench
	$(PY) benchmarks/run_all.py

lint: install-bench
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
