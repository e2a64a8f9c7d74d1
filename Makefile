# The README's two commands: `make train` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m lunarl.train +experiment=rover $(ARGS)

# Two workers by default (the CI box has 2 cores); TEST_WORKERS=0 runs in one process. Whole
# files go to the workers in collection order (tests/conftest.py puts the costly ones first),
# not xdist's default of the files with the most tests first.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m lunarl.run.numerics
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check lunarl scripts tests

bench: $(STAMP)
	$(PY) scripts/bench_envs.py
	$(PY) scripts/bench_ppo.py

clean-venv:
	rm -rf $(VENV)
