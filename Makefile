# slmops: `make demo` runs the offline quickstart, `make test` runs ruff and the test suite.
# Both create .venv on first use (pip; torch==2.13.0 CPU first so no CUDA build is pulled). `make test` also
# builds llama-cpp-python (GGUF export and the llama.cpp engine) once, with flags that avoid the AMX kernels
# that crash on quantized models on some CPUs (~5 min on 2 cores; the wheel is kept in .cache/llama-cpp).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slmops-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean llama-cpp chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,export]'
	touch $(STAMP)

LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_CACHE ?= .cache/llama-cpp
LLAMA_CPP_SDIST := $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

llama-cpp: $(LLAMA_STAMP)

$(LLAMA_CPP_SDIST):
	mkdir -p $(LLAMA_CPP_CACHE)
	$(PY) -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
	  -d $(LLAMA_CPP_CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION)

# pip's own wheel cache ignores CMAKE_ARGS (it could hand back a native build), so the wheel is kept here
$(LLAMA_STAMP): $(STAMP) $(LLAMA_CPP_SDIST)
	ls $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-cache-dir -w $(LLAMA_CPP_CACHE) $(LLAMA_CPP_SDIST)
	$(PY) -m pip install -q --disable-pip-version-check $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl \
	  'gguf>=0.17' 'sentencepiece>=0.2'
	$(PY) -m slmops.export.llamacpp install-converter --sdist $(LLAMA_CPP_SDIST)
	$(PY) -m slmops.export.llamacpp status
	touch $@

demo: $(STAMP)
	$(VENV)/bin/slmops quickstart --workdir slmops-quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# the report test looks at a screenshot taken by a real headless browser: Debian's chromium (installed when
# missing and apt is usable; the test skips, saying why, where it cannot be installed)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } ; } || \
	  echo "note: chromium is not installed and could not be; the HTML report's browser test will be skipped"

test: lint llama-cpp chromium
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf slmops-quickstart .slmops .pytest_cache .ruff_cache
