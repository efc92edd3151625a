# Two commands a user types on a fresh machine: `make quickstart` and `make test`.
# Each one first builds the virtual environment in .venv (once; again when pyproject.toml changes).
#
# PyTorch: an importable torch is never replaced. With none, a CUDA machine gets the default
# build and a CPU-only machine gets the CPU build $(TORCH_SPEC), from TORCH_INDEX when set
# (for example the PyTorch CPU wheel index), so no CUDA packages land on a machine without a GPU.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed

.PHONY: setup test lint quickstart clean gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "setup: reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "setup: GPU found, installing torch"; $(PIP) install -q torch; \
	  else \
	    echo "setup: no GPU, installing the CPU build $(TORCH_SPEC)"; \
	    $(PIP) install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	  fi; \
	fi
	$(PIP) install -q -e ".[dev]"
	@$(PY) -c "import torch, transformers; print('setup: torch', torch.__version__, '| transformers', transformers.__version__)"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

quickstart: setup
	$(PY) -m engine.pipeline

# The wheels benchmarks/gpu_check.py installs on a GPU machine that reaches no registry (it has torch,
# transformers, peft and accelerate, Python 3.12): bitsandbytes, datasets with the two needs the image lacks,
# and trl. About 50 MB into $(GPU_WHEELS) (ignored by git), for the device call to carry.
GPU_WHEELS      ?= .whl
GPU_PYTHON      ?= 3.12
GPU_WHEEL_SPECS ?= bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)
	@ls -s $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .cache runs *.egg-info
