# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qcompile-installed
# The newest releases of the test dependencies, in a venv of their own (make test-latest).
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python

.PHONY: demo test test-latest constraints lint bench-smoke clean

# torch first, pinned: the CPU build of 2.13.0 is what the project is tested with,
# and an unpinned torch would pull gigabytes of CUDA packages. Then the test dependencies,
# pinned by constraints.txt so that `make test` passes today and next month.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qcompile.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The backend and real-model tests against the newest transformers, peft, bitsandbytes and triton:
# the next break shows here before a user sees it. torch stays at 2.13.0 (see above).
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --quiet --upgrade pip
	$(LATEST_PY) -m pip install --quiet torch==2.13.0
	$(LATEST_PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST_PY) -m pip list 2>/dev/null | grep -i -E '^(transformers|peft|bitsandbytes|triton|accelerate|safetensors) '
	$(LATEST_PY) -m pytest tests/backend tests/checkpoint tests/passes tests/test_demo.py

# Re-pin constraints.txt to what the test venv has now (after trying the new versions with test-latest).
constraints: $(STAMP)
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|pip|setuptools)=='; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
