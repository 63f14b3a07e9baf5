# Two entry points, each self-contained on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast lint format bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m rlhf_jax.run --config=experiments/toy_quickstart.py --workdir=runs/quickstart

# The whole suite (what CI runs). `make test-fast` skips the slow end-to-end tests.
test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadfile -q --durations=25 -o faulthandler_timeout=900 tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q tests/unit

# Formatting (pyink: 2-space indentation, 100 columns) and lint (ruff), configured in pyproject.toml.
LINTED := rlhf_jax tests experiments scripts notebooks
lint: $(STAMP)
	$(PY) -m pyink --check --quiet $(LINTED)
	$(PY) -m ruff check --quiet $(LINTED)

format: $(STAMP)
	$(PY) -m pyink --quiet $(LINTED)
	$(PY) -m ruff check --quiet --fix $(LINTED)

bench: $(STAMP)
	$(PY) -m rlhf_jax.bench

clean:
	rm -rf $(VENV) runs
