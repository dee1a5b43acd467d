# mml-recall: two commands on a fresh machine.
#   make run   prepare data, train a quick profile if no bundle exists, export, serve on localhost:8000
#   make test  set up and run the test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ART ?= artifacts
DATA ?= $(ART)/data/ml-1m
RUN ?= $(ART)/runs/quick
BUNDLE ?= $(ART)/bundles/quick
PORT ?= 8000
# Data comes from the official sources unless a mirror is named. When this checkout sits next to
# the read-only mirror in ../shared/datasets, use it (the machine has no internet access).
MML_DATA_MIRROR ?= $(if $(wildcard ../shared/datasets/ml-1m/ratings.dat),$(abspath ../shared/datasets),)
export MML_DATA_MIRROR

.PHONY: help setup run test bench results lint data features train export serve clean loadtest ab-replay

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[training,serving,dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project

# Your own data instead of ML-1M: SOURCE = a folder in the generic format (docs/data.md), T = its
# reference time (unix seconds or ISO-8601), DATA = where its split goes, e.g.
#   make results DATA=artifacts/data/shop SOURCE=/data/shop T=2024-01-01T00:00:00Z
SOURCE ?=
T ?=
data: $(STAMP) ## download (or mirror) ML-1M, or read SOURCE, and build the cold-start split
	@if [ -z "$(SOURCE)" ] && [ "$(DATA)" != "$(ART)/data/ml-1m" ] && [ -f $(DATA)/meta.json ]; then \
		echo "using the split already prepared in $(DATA)"; \
	else $(BIN)/mml data prepare --out $(DATA) $(if $(SOURCE),--source $(SOURCE),) $(if $(T),--T $(T),); fi

features: data ## encode item text and posters with the pretrained encoders
	$(BIN)/mml data features --data $(DATA)

# extra `mml train` flags, e.g. TRAIN_ARGS="--device cuda", or "--profile full" after --profile quick
# (the report's budget; use another RUN and BUNDLE)
TRAIN_ARGS ?=
train: features ## train the quick profile (skipped when a bundle exists)
	@if [ -f $(BUNDLE)/manifest.json ]; then echo "bundle $(BUNDLE) exists: not retraining"; \
	else $(BIN)/mml train --data $(DATA) --profile quick --out $(RUN) $(TRAIN_ARGS); fi

export: train ## export the trained run to a serving bundle
	@if [ -f $(BUNDLE)/manifest.json ]; then echo "bundle $(BUNDLE) exists"; \
	else $(BIN)/mml export --run $(RUN) --out $(BUNDLE); fi

# the arm served: MML + co-occurrence, the report's best (docker/arms.default.yaml); ARMS= for plain mml
ARMS ?= docker/arms.default.yaml
serve: $(STAMP) ## serve the bundle on localhost:$(PORT)
	$(BIN)/mml serve --bundle $(BUNDLE) --host 127.0.0.1 --port $(PORT) $(if $(ARMS),--arms $(ARMS),)

run: export serve ## everything: data -> features -> train -> export -> serve

test: $(STAMP) ## run the test suite
	$(BIN)/pytest -q

bench: $(STAMP) ## benchmarks -> docs/results/bench.json
	PYTHONPATH=. $(BIN)/mml bench --out docs/results/bench.json  # loadtest/ is not an installed package

# every method of docs/results.md: baselines, MML and its ablations, MML + co-occurrence, the paper's
# recipe, SASRec + co-occurrence; RQ4 points with one seed (2 CPU cores)
EVAL_METHODS ?= pop,itemknn,sasrec,gru4rec,full_retrain,sasrec_ft,sml,cbml,metatl,pt_ft,mml,mml_cooc,no_gen,no_fusion,mml_id,mml_text,mml_image,mml_zero_shot,mml_paper,sasrec_cooc
# the report of ML-1M is docs/results.md; any other DATA gets docs/results-<its folder name>.md
REPORT ?= $(if $(filter $(ART)/data/ml-1m,$(DATA)),docs/results.md,docs/results-$(notdir $(DATA)).md)
EVAL_PROFILE ?= quick
results: features ## regenerate the evaluation report (DATA=any prepared split; hours on 2 cores; resumes)
	$(BIN)/mml evaluate --data $(DATA) --out docs/results --report $(REPORT) --seeds 3 \
		--methods $(EVAL_METHODS) --rq4-seeds 1 --profile $(EVAL_PROFILE)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(ART) .cache

# --- reliability and security (reliability/, docs/reliability.md) ---------------------------------
.PHONY: fuzz faults soak audit
FUZZ_EXAMPLES ?= 1000
SOAK_SECONDS ?= 600
SOAK_RATE ?= 50

fuzz: $(STAMP) ## schemathesis over the OpenAPI spec (thousands of requests) -> docs/results/reliability.json
	$(BIN)/python -m reliability.fuzz --examples $(FUZZ_EXAMPLES)

faults: $(STAMP) ## Redis killed / slowed, 10 hot reloads, corrupted bundles, under load
	$(BIN)/python -m reliability.faults

soak: $(STAMP) ## SOAK_SECONDS at SOAK_RATE req/s, 2 workers: RSS and open fds per worker
	$(BIN)/python -m reliability.soak --seconds $(SOAK_SECONDS) --rate $(SOAK_RATE)

audit: $(STAMP) ## pip-audit of the installed packages; canary secrets in a fresh bundle
	$(BIN)/python -m reliability.audit --with-encoders

loadtest: export ## load test: serve the bundle on 127.0.0.1, locust 60 s -> docs/results/loadtest.md
	$(BIN)/python -m loadtest.run --bundle $(BUNDLE) --data-dir $(DATA) $(LOADTEST_ARGS)

ab-replay: export ## A/B replay: new users' interactions against popularity vs MML, read by mml ab report -> docs/results/ab-replay.json
	$(BIN)/python -m loadtest.ab_replay --bundle $(BUNDLE) --data-dir $(DATA) $(AB_REPLAY_ARGS)
