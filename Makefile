# The two quickstart commands: `make demo` (set up; on the built-in synthetic set run a
# short search, retrain the best trial into a registered champion, predict a few new images,
# write the report and print how to serve the champion) and `make test` (set up, run the
# test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TRIALS ?= 6
MT := ../$(BIN)/mapnet-tune
# Three new synthetic images of different sizes (one odd) for the demo's predict step.
DEMO_IMAGES := import numpy as np; from PIL import Image; \
  from mapnet_tune.data.synthetic import vessel_image; \
  [Image.fromarray((vessel_image(np.random.default_rng([99, s]), s, 3)[0].transpose(1, 2, 0) \
  * 255).astype(np.uint8)).save(f"images/vessels-{s}.png") for s in (64, 80, 101)]

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
	mkdir -p demo/images
	cd demo && $(MT) search --dataset synthetic --trials $(TRIALS)
	cd demo && $(MT) retrain-best --study synthetic --top-k 1
	cd demo && ../$(BIN)/python -c '$(DEMO_IMAGES)'
	cd demo && $(MT) predict --model models:/mapnet-synthetic@champion images/*.png \
	  --out predictions
	cd demo && $(MT) report --study synthetic
	cd demo && $(MT) status --study synthetic

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
