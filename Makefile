# The README's two commands: `make train` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all lint bench lock clean-venv

# The install is pinned to constraints.txt, so every machine gets the versions the suite last
# passed with (newer releases can change floats, and the Dreamer car runs amplify them);
# CONSTRAINTS= installs the newest versions pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
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

# Rewrites constraints.txt from a fresh venv at the newest versions pyproject.toml allows; run
# `make test` after it and commit both together.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]"
	{ echo "# The versions make test and make train install (pip -c constraints.txt), the ones"; \
	  echo "# the suite last passed with. Written by make lock (a fresh venv at the newest"; \
	  echo "# versions pyproject.toml allows); make test CONSTRAINTS= installs without it."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf $(LOCK_VENV)

clean-venv:
	rm -rf $(VENV)
