# The two commands of the README: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
LOWEST ?= .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed

.PHONY: install demo test test-lowest lint bench compat

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo needs celery-tq and Flower only, not the test and lint toolchain of [dev].
$(DEMO_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[flower]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict celery_tq

# pytest-xdist: one test process per Redis database base (tests/conftest.py); a second checkout
# running at the same time on the same Redis passes TQ_TEST_REDIS_DB_BASES=8,10,12,14.
TQ_TEST_REDIS_DB_BASES ?= 0,2,4,6
export TQ_TEST_REDIS_DB_BASES
comma := ,
TEST_WORKERS ?= $(words $(subst $(comma), ,$(TQ_TEST_REDIS_DB_BASES)))

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The lowest versions setup.cfg allows (ci/lowest-constraints.txt), with the unit tests: a
# widened version range is a tested claim. .ci/run runs it after `make test`.
$(LOWEST_STAMP): setup.cfg pyproject.toml ci/lowest-constraints.txt
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -c ci/lowest-constraints.txt -e ".[test]"
	touch $(LOWEST_STAMP)

test-lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/python -m pytest -q tests/unit -p no:cacheprovider

# Celery's own integration suite: plain Celery and the installed app side by side (README, Tests).
COMPAT_ARGS ?= --parallel --configs installed --files test_tasks.py test_canvas.py
compat: $(STAMP)
	$(PY) scripts/celery_suite.py $(COMPAT_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/embedded_broker.py
