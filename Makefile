# make demo: set up .venv and run the demo recipe on the embedded model.
# make test: set up .venv and run the whole test suite (what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint fast-test model browser clean llama-cpp

INSTALL_LOG := $(VENV)/install.log
PIP := PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip install --quiet --no-warn-script-location

$(PY):
	@$(PYTHON) -m venv $(VENV)

# torch first, on its own: the exact CPU build lies on the machine's disk, and letting another package
# pull "torch" instead downloads a multi-GB CUDA build. pip's and setuptools' chatter goes to the log,
# which is printed whole (and make stops) when a step fails.
$(STAMP): pyproject.toml | $(PY)
	@echo "Installing compress and its pinned libraries into $(VENV) (a few minutes; pip's output: $(INSTALL_LOG))"
	@{ $(PIP) --upgrade pip && $(PIP) torch==2.13.0 && $(PIP) -e ".[dev]"; } > $(INSTALL_LOG) 2>&1 || \
	  { cat $(INSTALL_LOG); echo "make install failed; pip's output is above and in $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)

# llama.cpp (tools, library, converter) from the pinned llama-cpp-python 0.3.36 sdist, built once per machine
# into $$COMPRESS_CACHE or ~/.cache/compress (about 3-6 minutes on 2 cores); then its Python bindings, installed
# without a library of their own (they load the one built here).
LLAMA_STAMP := $(VENV)/.llama-cpp
$(LLAMA_STAMP): $(STAMP) compress/runtimes/llama_cpp_tools.py
	@$(PY) -m compress.runtimes.llama_cpp_tools build
	@CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) "$$($(PY) -c 'from compress.runtimes.llama_cpp_tools import source; print(source())')" >> $(INSTALL_LOG) 2>&1 || \
	  { tail -30 $(INSTALL_LOG); echo "installing llama-cpp-python's bindings failed; pip's output is in $(INSTALL_LOG)"; exit 1; }
	@touch $(LLAMA_STAMP)

install: $(STAMP) $(LLAMA_STAMP)

llama-cpp: $(LLAMA_STAMP)

demo: install
	@$(VENV)/bin/compress run recipes/tiny-phi4-mini.yaml --out runs/demo

lint: install
	$(VENV)/bin/ruff check compress tests

# The HTML report test opens report.html in headless Chromium (Debian's package; needs root to install).
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null); } || \
	  echo "chromium not installed: the browser test will be skipped"

test: lint browser
	$(PY) -m pytest -q --durations=15

fast-test: install
	$(PY) -m pytest -q -m "not slow"

# Retrain the embedded model (about 12 minutes on 2 cores); the result is committed under compress/assets.
model: install
	$(PY) -m compress.assets.build_tiny

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# Benchmarks (at most 30 minutes on 2 cores; run them alone on the machine). Writes
# benchmarks/results/<date>-<host>.json and .md and prints the table. One: python -m benchmarks.run --only decode
.PHONY: bench
bench: install
	$(PY) -m benchmarks.run
