# `make demo` and `make test` each create .venv (if missing), install reolm into it and run.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so nothing
# pulls the multi-GB CUDA packages; with a GPU, pip's default (CUDA) build is used. Both install
# TORCH_SPEC, the version the test suite runs with.
# `make test` also creates .venv-img2dataset/ (once): img2dataset for the tiny recipe's end-to-end
# test (tests/test_recipe_tiny.py). It pins webdataset<0.3 and pulls pandas, pyarrow, OpenCV and
# wandb, so it cannot share .venv. If it cannot be created the test skips, or fails with CI=true.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.reolm-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
I2D_VENV ?= .venv-img2dataset
I2D_SPEC ?= img2dataset==1.47.0
I2D_STAMP := $(I2D_VENV)/.installed
# DeepSpeed JIT-builds its CPU shared-memory op (about 30 s) into TORCH_EXTENSIONS_DIR, one build
# per environment: a folder per virtual environment keeps two checkouts (two venvs) from
# rebuilding it in turn. A value already set in the environment wins.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# Every process the targets start finds the venv's tools first, as in an activated venv. The
# build above runs `ninja` from PATH: a system ninja of another version next to the venv's
# (processes with and without the venv on PATH) made each switch rebuild the op from scratch.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test venv clean-venv bench-cpu img2dataset-venv reproduce-tiny

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

# img2dataset in its own environment; the leading '-' lets `make test` go on when it cannot be
# created (no PyPI here): the end-to-end recipe test then says why it skips.
$(I2D_STAMP):
	@test -x $(I2D_VENV)/bin/python || $(PYTHON) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install -q --upgrade pip
	$(I2D_VENV)/bin/python -m pip install -q "$(I2D_SPEC)"
	@touch $(I2D_STAMP)

img2dataset-venv: $(I2D_STAMP)

test: $(STAMP)
	-@$(MAKE) --no-print-directory $(I2D_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The paper's recipe at tiny scale, end to end on this machine (docs/reproduce.md).
reproduce-tiny: $(STAMP) $(I2D_STAMP)
	$(PY) -m reolm reproduce --config launch/configs/reproduce/tiny.yaml --tiny-inputs

clean-venv:
	rm -rf $(VENV)
