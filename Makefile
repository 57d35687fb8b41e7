# catdog: local entry points.  Every target bootstraps .venv when it is missing or older than
# pyproject.toml, so `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
DATA_DIR ?= ../shared/data/dogs-vs-cats
# Extra config overrides, e.g. make train SET="train.epochs=2 run_name=try2".  Spaces inside [...], {...} or
# quotes do not split: SET="models=[resnet18, mobilenet_v2]" is one override.
SET ?=
PYTEST_ARGS ?=
# Which tests `make test` runs (a pytest -m expression), e.g. MARK="not slow" or MARK=bench.
MARK ?= not bench
# Recipes read these from the environment, always quoted, so paths and values with spaces stay whole.
export SET DATA_DIR CONFIG INPUT MARK
# Prefix of a job command: puts its --set arguments (data.train/data.test from DATA_DIR, then SET) into the
# bash array "sets".
JOB_SETS = mapfile -d '' -t sets < <($(PY) -m catdog.config "$$DATA_DIR" "$$SET") &&
export CATDOG_DATA ?= $(shell realpath -m -- "$(DATA_DIR)")

.PHONY: install test lint format run train predict evaluate bench clean check-data gpu-kit

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Two passes over the tests that MARK selects.  Most on two pytest-xdist workers: on 2 cores a single
# pytest leaves about 30% of the CPU idle (process start-ups, Ray Train's report polls); tests/conftest.py
# keeps each module on one worker (the longest first, tests/durations.json).  Torch's OpenMP threads
# wait passively in that pass: by default they spin, and with two workers' processes on two cores the
# spinning took the cores from the other's compute (two ResNet18 loops at once: 28 img/s each spinning,
# 49 passive; alone, spinning is 10% faster, so jobs keep the default; bench/NOTES.md, "Where the test
# suite's time goes").  Then the `serial` tests alone: they assert wall-clock budgets, which must not
# share the cores.  Exit code 5 (nothing selected in a pass) is not a failure.
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 -m "($$MARK) and not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "($$MARK) and serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(PY) -m ruff check catdog jobs tests bench gpu_kit
	$(PY) -m ruff format --check catdog jobs tests bench gpu_kit

format: $(STAMP)
	$(PY) -m ruff format catdog jobs tests bench gpu_kit
	$(PY) -m ruff check --fix catdog jobs tests bench gpu_kit

check-data:
	@if [ ! -d "$(DATA_DIR)/train" ] || [ ! -d "$(DATA_DIR)/test1" ]; then \
	  echo "catdog: no Kaggle Dogs vs Cats images in $(DATA_DIR) (expected $(DATA_DIR)/train and $(DATA_DIR)/test1)."; \
	  echo "Get them with the Kaggle CLI:  kaggle competitions download -c dogs-vs-cats && unzip dogs-vs-cats.zip"; \
	  echo "then unzip train.zip and test1.zip into $(DATA_DIR)/, or pass DATA_DIR=/path/to/folder (see README.md, 'Data')."; \
	  exit 1; fi

train: $(STAMP) check-data
	$(JOB_SETS) $(PY) jobs/train.py --config "$$CONFIG" "$${sets[@]}"

predict: $(STAMP) check-data
	$(JOB_SETS) $(PY) jobs/predict.py --config "$$CONFIG" "$${sets[@]}"

# Without INPUT: the run's validation split (never training images).
evaluate: $(STAMP) check-data
	$(JOB_SETS) $(PY) jobs/evaluate.py --config "$$CONFIG" "$${sets[@]}" $${INPUT:+--input "$$INPUT"}

run: train predict

bench: $(STAMP) check-data
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/plan_scale.py

# The GPU check kit in .gpu-kit/ (git-ignored, <= 60 MiB): cp312 wheels, real images, run.sh (README, "GPU check").
# Downloads from PyPI.  Needs only pip and the standard library, so it does not set up .venv.
gpu-kit: check-data
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m gpu_kit.build --out .gpu-kit --data $(DATA_DIR)

clean:
	rm -rf runs .pytest_cache .ruff_cache catdog.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

include cluster/cluster.mk
