# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test protos clean

# pytest-xdist workers: most tests wait on servers and agents more than they compute.
# On this 2-core box (2026-12-06, fresh clone): 4 workers 290 s, 6 workers 243-252 s,
# 8 workers 274 s with one hand-over wait timing out: past 6 the workers only queue.
TEST_WORKERS ?= 6
# A worker is handed one more test each time it finishes one (xdist's default handed out
# runs of consecutive tests: one worker got every human-runbook test at once, and ran
# them alone for the last quarter of the run), except that a module marked
# xdist_group goes to one worker whole, largest first: its module-scoped server or
# fleet is then built once instead of once on every worker that ran one of its tests.
TEST_DISTRIBUTION := --dist loadgroup

$(VENV)/.python-ok:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-run: pyproject.toml $(VENV)/.python-ok
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.python-ok
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-run

## demo: control server on SQLite + 1,000 simulated agents, until Ctrl-C
demo: $(VENV)/.installed-run
	bash scripts/demo.sh

## test: lint, type-check and the whole test suite
# The suite starts hundreds of Python processes (servers, agents, CLI calls, pytest and its
# workers). Where the environment says not to write bytecode, as many CI images do, each
# compiled the project again and each pytest process rewrote every test's asserts again
# (5 s of CPU each). The caches go to __pycache__/, which git ignores.
test: export PYTHONDONTWRITEBYTECODE =
test: $(VENV)/.installed-dev
	bash scripts/test-tools.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -n $(TEST_WORKERS) $(TEST_DISTRIBUTION)

## protos: regenerate the committed Python code from protos/*.proto
protos: $(VENV)/.installed-dev
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) demo-data demo-people
