# CTR/CVR ranking pipeline. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_USE_LEGACY_KERAS := 1
export PYTHONWARNINGS ?= ignore

# make etl
INPUT ?=
EVAL_INPUT ?=
# VALID_INPUT=<glob>: a valid split for model selection (or ARGS='--set valid_fraction=0.1')
VALID_INPUT ?=
FORMAT ?=
FIELD_MAP ?=
# FIELDS=<tsv>: field<TAB>name<TAB>kind rows (libffm integer field ids, continuous fields; docs/ETL.md)
FIELDS ?=
LABELS ?=
CONFIG ?=
OUT ?= data/etl
RAW ?= data/raw
# generator flags when no INPUT, e.g. GEN_ARGS='--preset quality'
GEN_ARGS ?=
# make train
DATA ?= data/etl
MODEL ?=
EXPERIMENT ?=
RUN_DIR ?= runs/default
EXPORT_BASE ?= runs/export
# DISTRIBUTE=ps: ParameterServerStrategy on a local cluster of WORKERS workers and PS parameter servers
DISTRIBUTE ?=
WORKERS ?= 2
PS ?= 2
# WARM_START=<run dir or export version dir>: initialise from yesterday's model
WARM_START ?=
# make serve
PORT ?= 8500
SERVING_CONFIG ?=
# extra flags for the underlying command, e.g. ARGS='--set train.epochs=3'
ARGS ?=

.PHONY: help install etl train tune serve test test-all bench clean

help:
	@echo "make install                 virtualenv in $(VENV) with pinned dependencies"
	@echo "make etl [INPUT=<glob>] [EVAL_INPUT=<glob>] [VALID_INPUT=<glob>] [FORMAT=libfm|libffm] [FIELD_MAP=<tsv>]"
	@echo "         [FIELDS=<tsv>] [LABELS=a,b] [OUT=<dir>] [CONFIG=<yaml>] [ARGS='--set valid_fraction=0.1']"
	@echo "                             no INPUT: generate the default click log into $(RAW) first"
	@echo "                             [GEN_ARGS='--preset quality|esmm --n-train N ...'] generator flags (no INPUT)"
	@echo "make train [DATA=<etl out>] [MODEL=<name>] [EXPERIMENT=<name>] [RUN_DIR=<dir>] [EXPORT_BASE=<dir>]"
	@echo "           [DISTRIBUTE=ps WORKERS=2 PS=2] [WARM_START=<run dir or export>]"
	@echo "make tune [DATA=<etl out>] [MODEL=<name>] [EXPERIMENT=<name>] [OUT=<dir>] ARGS='--grid KEY=V1,V2 [--seeds 42,1,2] ...'"
	@echo "                             without OUT the trials go to a new temporary directory"
	@echo "make serve [EXPORT_BASE=<dir>] [MODEL=<name>] [PORT=8500] [SERVING_CONFIG=<models.config>]"
	@echo "                             gRPC server (TF Serving's protocol) over what make train exported"
	@echo "make test                    default test suite (slow suites: make test-all)"
	@echo "make bench                   benchmarks (tables on stdout, JSON under runs/bench)"

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

ETL_FLAGS = $(if $(VALID_INPUT),--valid_input '$(VALID_INPUT)') $(if $(FIELDS),--fields_tsv $(FIELDS)) \
  --out $(OUT) $(ARGS)

# configs/etl_generated.yaml joins {input_dir}/items.tsv: the table next to the input, so RAW=<dir> works.
etl: install
ifeq ($(INPUT),)
	$(PY) -m generator.clicklog --out $(RAW) --formats libffm,libfm $(GEN_ARGS)
	$(PY) -m etl.pipeline --config $(or $(CONFIG),configs/etl_generated.yaml) --input $(RAW)/train.libffm \
	  --eval_input $(RAW)/eval.libffm $(ETL_FLAGS)
else
	$(PY) -m etl.pipeline $(if $(CONFIG),--config $(CONFIG)) --input '$(INPUT)' \
	  $(if $(EVAL_INPUT),--eval_input '$(EVAL_INPUT)') $(if $(FORMAT),--format $(FORMAT)) \
	  $(if $(FIELD_MAP),--field_map $(FIELD_MAP)) $(if $(LABELS),--labels $(LABELS)) $(ETL_FLAGS)
endif

TRAIN_FLAGS = --data $(DATA) --run_dir $(RUN_DIR) --export_base $(EXPORT_BASE) \
  $(if $(MODEL),--model $(MODEL)) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) \
  $(if $(WARM_START),--set train.warm_start=$(WARM_START)) $(ARGS)

train: install
ifeq ($(DISTRIBUTE),ps)
	$(PY) -m trainer.distributed launch --workers $(WORKERS) --ps $(PS) -- $(TRAIN_FLAGS)
else ifeq ($(DISTRIBUTE),)
	$(PY) -m trainer.train $(TRAIN_FLAGS)
else
	@echo "DISTRIBUTE=$(DISTRIBUTE): expected ps or nothing" && exit 2
endif
	$(PY) -m trainer.quiet export.exporter --run_dir $(RUN_DIR)

# Hyper-parameter search (trainer/tune.py), e.g. make tune DATA=data/frappe MODEL=ffm ARGS='--grid ...';
# trials go to OUT only when OUT is given (make tune OUT=runs/tune/x), else to a new temporary directory.
TUNE_OUT = $(if $(filter command line environment environment override,$(origin OUT)),--out $(OUT))
tune: install
	$(PY) -m trainer.tune --data $(DATA) $(if $(MODEL),--model $(MODEL)) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) \
	  $(TUNE_OUT) $(ARGS)

# Local TF-Serving-protocol gRPC server (serving/server.py): every model under EXPORT_BASE, or MODEL=
# (what `make train` exported), on PORT; SERVING_CONFIG=serving_configs/models.config serves a TF Serving
# config file with its base paths mapped under EXPORT_BASE.
serve: install
ifeq ($(SERVING_CONFIG),)
	$(PY) -m serving.server --export_base $(EXPORT_BASE) $(if $(MODEL),--model_name $(MODEL)) --port $(PORT) $(ARGS)
else
	$(PY) -m serving.server --model_config_file $(SERVING_CONFIG) --base_path $(EXPORT_BASE) --port $(PORT) $(ARGS)
endif

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-all: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf data runs
