# `make run`: create .venv, install, and pretrain with the default preset on a local, embedded Ray
# (without a GPU at the small size, which learns on a CPU; ARGS="--preset paper" forces the paper's).
# `make test`: create/update .venv and run the whole test suite.
#
# torch: `pip install torch==2.13.0` takes the local CPU build on these machines. For a CUDA build
# set TORCH_INDEX, e.g. `make run TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
PIP := $(VENV)/bin/pip
QUIET_PIP := grep -v "^WARNING: Location" || true

.PHONY: venv run test test-fast bench clean-venv device-bundle

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q -U pip 2>&1 | $(QUIET_PIP)
	@$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH)" 2>&1 | $(QUIET_PIP)
	@$(PIP) install -q -e ".[test]" 2>&1 | $(QUIET_PIP)
	@$(VENV)/bin/python -c "import torch, ray, dm_control, metaworld, gymnasium, msgpack, tensorboard" 
	@touch $@
	@echo "installed into $(VENV)"

run: venv
	$(VENV)/bin/choreo pretrain --fit-machine $(ARGS)

test: venv
	@rc=0; $(VENV)/bin/python -m pytest $(ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-fast: venv
	@$(MAKE) --no-print-directory test ARGS="-m 'not slow' $(ARGS)"

# What a lent GPU machine lacks for `choreo bench device` (its image has torch, numpy, yaml and
# msgpack, not gymnasium), as wheels for its Python (3.12) in .device/wheels, to carry there:
# see docs/performance.md, "On a GPU".
DEVICE_PYTHON ?= 3.12
device-bundle: venv
	rm -rf .device && mkdir -p .device/wheels
	$(VENV)/bin/pip wheel -q --no-deps --no-build-isolation -w .device/wheels . 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) \
	  -d .device/wheels gymnasium==1.4.0 farama-notifications==0.0.6 2>&1 | $(QUIET_PIP)
	@du -sh .device

clean-venv:
	rm -rf $(VENV)
