# make check     linters and the fast tests (a scripted engine, no model weights): about a minute
# make test-all  linters and the whole suite, real weights and real servers included (what CI runs)
.PHONY: check lint test-all

lint:
	ruff check .
	ruff format --check .
	mypy

check: lint
	python -m pytest -m "not real" -q

test-all: lint
	python -m pytest
