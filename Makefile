# One entry point for a fresh machine: every target below builds .venv first when it is
# missing or older than the files that define it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qdistill-installed
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=

.PHONY: venv test demo demo-vision lint bench clean-venv

venv: $(STAMP)

# Rebuilt when a file that defines the environment changes; a second run installs nothing.
$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) Makefile
	@test -x $(PY) && $(PY) -c "import sys; sys.exit(sys.version_info < (3, 10))" || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(PIP) install -q -c $(CONSTRAINTS) torch torchvision
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps OpenNMT-py
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,onmt,vision,ans]"
	$(PY) -m onmt_plugin.install
	$(PY) -c "import torch, torchvision, onmt, compressor; print('qdistill environment ready: torch', torch.__version__, 'onmt', onmt.__version__)"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS) tests

# The main job: an OpenNMT-py translator (Multi30k de->en sample) compressed end to end.
demo: $(STAMP)
	$(PY) -m onmt_plugin.demo --output-dir demo_out/multi30k

# The same for a torchvision classifier (CIFAR-10 sample).
demo-vision: $(STAMP)
	$(PY) -m vision_plugin.demo --output-dir demo_out/cifar10

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
