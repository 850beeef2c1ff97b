# Every target sets itself up: a fresh clone needs only python3 (>= 3.10), a C compiler and
# the Python headers.  The virtual environment lives in .venv/.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo probe test lint typecheck unit test-kernels bench clean

$(STAMP): pyproject.toml setup.py $(wildcard src/native/*.c src/native/*.h)
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,cli,plot,exporter]'
	touch $(STAMP)

# The first thing to run: a small Python program that writes its memory in phases, tracked
# by pagewatch run (a summary per interval and mapping), then the recording's report and plot.
demo: $(STAMP)
	$(VENV)/bin/pagewatch run --interval 0.25 -o demo.jsonl --force -- $(VPY) -m pagewatch.demo
	$(VENV)/bin/pagewatch report demo.jsonl --top 5
	$(VENV)/bin/pagewatch plot demo.jsonl --force

# What this machine's kernel offers, each "no" with its reason: the diagnostic step.
probe: $(STAMP)
	$(VENV)/bin/pagewatch probe

# Lint, type-check, then the test suite.  Fails on the first failure.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(VPY) -m pytest -q

# The same suite under other kernels (Debian's 6.1 and 6.12) booted with virtme-ng.
test-kernels: $(STAMP)
	$(VPY) -m tests.vm

bench: $(STAMP)
	$(VENV)/bin/pagewatch bench --quick

clean:
	rm -rf $(VENV) build src/*.egg-info src/pagewatch/*.so demo.jsonl demo.png
