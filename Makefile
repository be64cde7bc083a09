# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.voxflow-installed

.PHONY: install demo test lint bench bench-scaled bench-segment bench-register clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a later resolve must not reach for the CUDA wheels.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/voxflow demo

lint: install
	$(BIN)/ruff check voxflow tests benchmarks
	$(BIN)/ruff format --check voxflow tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/pyramid.py

bench-scaled: install
	$(BIN)/python benchmarks/scaled.py

bench-segment: install
	$(BIN)/python benchmarks/segment.py

bench-register: install
	$(BIN)/python benchmarks/register.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
