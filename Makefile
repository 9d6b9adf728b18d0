# Two entry points: `make demo` (install, then run the main job on the embedded synthetic
# data) and `make test` (install, then ruff, mypy and the test suite; settings in pyproject.toml). Both create .venv on first use.
# `make compose-test` builds and runs the Docker Compose stack (tests/deploy/test_compose_stack.py):
# .ci/docker-up first installs Docker from Debian and starts dockerd where it can (root).
# `make test` runs that test too when a daemon answers, and skips it (saying why) when none does.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test compose-test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test,bench]'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

compose-test: $(STAMP)
	bash .ci/docker-up
	$(BIN)/python -m pytest -q -s -m compose tests/deploy

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
