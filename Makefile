# Set-up and the two everyday commands. `make demo` and `make test` install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-slow lint clean

$(BIN)/learnforget: pyproject.toml scripts/install.sh
	VENV=$(VENV) PY=$(PY) bash scripts/install.sh
	@touch $@

install: $(BIN)/learnforget

demo: install          ## the main job: a tiny LoRA run on local code, evaluated and analysed, W&B offline
	$(BIN)/learnforget train eval.after_train=true
	$(BIN)/learnforget analyze runs

test: install          ## the default (fast) test suite
	$(BIN)/python -m pytest -q

test-slow: install     ## the slow tests only (real SmolLM2 and friends)
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
