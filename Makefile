# `make demo` and `make test` each create .venv (if missing), install reolm into it and run.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so nothing
# pulls the multi-GB CUDA packages; with a GPU, pip's default (CUDA) build is used. Both install
# TORCH_SPEC, the version the test suite runs with.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.reolm-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test venv clean-venv bench-cpu

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
else
	$(PY) -m pip install -q "$(TORCH_SPEC)"
endif
	# DeepSpeed's setup.py imports torch: build it against the torch installed above
	# (with build isolation pip would fetch a second, CUDA, torch into the build env).
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
