# qq-twin: `make demo` runs the whole path offline; `make test` runs the test suite.
# Both create .venv/ in the repo root on first use (Python 3.10+ and a C compiler needed).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, so the range in pyproject.toml is already satisfied (no surprise multi-GB CUDA pull).
# Pick another build with e.g. `make setup TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu128'`.
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python builds from source: a portable CPU build (native flags crash in decode on some
# machines, and a wheel must run wherever it is copied). pip caches the built wheel.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
STAMP := $(VENV)/.qq-twin-installed

.PHONY: setup demo test test-fast console-screenshots lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install $(TORCH_SPEC)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install "llama-cpp-python>=0.3.7"
	$(PIP) install -e ".[dev]"
	# llama.cpp's own GGUF converter, matching the installed llama-cpp-python (cached once)
	$(PY) -c "from trainer.export import ensure_converter; print(ensure_converter())"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/twin demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not e2e"

# The console's pages in headless Chromium (Debian's chromium + chromium-driver; a CJK font such as
# fonts-noto-cjk for readable labels), saved as docs/console/*.png: one command refreshes them all.
console-screenshots: $(STAMP)
	TWIN_CONSOLE_SCREENSHOTS=docs/console $(PY) -m pytest -q -ra tests/e2e/test_console_browser.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/llm_clean.py
	$(PY) bench/train.py
	$(PY) bench/export.py
	$(PY) bench/bot.py
	$(PY) bench/serve_retrain.py
	$(PY) bench/store.py

clean:
	rm -rf demo-output .pytest_cache .ruff_cache
