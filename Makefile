# The two quickstart commands: `make demo` (set up, run a short search on the built-in
# synthetic set) and `make test` (set up, run the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TRIALS ?= 6

.PHONY: setup demo test lint format clean

$(BIN)/mapnet-tune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that pip never resolves plain `torch` to a CUDA build.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/mapnet-tune

demo: setup
	mkdir -p demo
	cd demo && ../$(BIN)/mapnet-tune search --dataset synthetic --trials $(TRIALS)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf demo .pytest_cache
