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

.PHONY: setup test lint quickstart clean

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

clean:
	rm -rf $(VENV) .cache runs *.egg-info
