# catdog: local entry points.  Every target bootstraps .venv when it is missing or older than
# pyproject.toml, so `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
DATA_DIR ?= ../shared/data/dogs-vs-cats
# Extra config overrides, e.g. make train SET="train.epochs=2 run_name=try2"
SET ?=
PYTEST_ARGS ?=
DATA_SETS := --set data.train=$(DATA_DIR)/train --set data.test=$(DATA_DIR)/test1 $(foreach s,$(SET),--set $(s))
export CATDOG_DATA ?= $(abspath $(DATA_DIR))

.PHONY: install test lint format run train predict evaluate bench clean check-data

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check catdog jobs tests bench
	$(PY) -m ruff format --check catdog jobs tests bench

format: $(STAMP)
	$(PY) -m ruff format catdog jobs tests bench
	$(PY) -m ruff check --fix catdog jobs tests bench

check-data:
	@if [ ! -d "$(DATA_DIR)/train" ] || [ ! -d "$(DATA_DIR)/test1" ]; then \
	  echo "catdog: no Kaggle Dogs vs Cats images in $(DATA_DIR) (expected $(DATA_DIR)/train and $(DATA_DIR)/test1)."; \
	  echo "Get them with the Kaggle CLI:  kaggle competitions download -c dogs-vs-cats && unzip dogs-vs-cats.zip"; \
	  echo "then unzip train.zip and test1.zip into $(DATA_DIR)/, or pass DATA_DIR=/path/to/folder (see README.md, 'Data')."; \
	  exit 1; fi

train: $(STAMP) check-data
	$(PY) jobs/train.py --config $(CONFIG) $(DATA_SETS)

predict: $(STAMP) check-data
	$(PY) jobs/predict.py --config $(CONFIG) $(DATA_SETS)

evaluate: $(STAMP) check-data
	$(PY) jobs/evaluate.py --config $(CONFIG) $(DATA_SETS) --input $(or $(INPUT),$(DATA_DIR)/train)

run: train predict

bench: $(STAMP) check-data
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/plan_scale.py

clean:
	rm -rf runs .pytest_cache .ruff_cache catdog.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

include cluster/cluster.mk
