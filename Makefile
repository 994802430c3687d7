# cast-train: one entry point for install, tests, benchmarks, shards and the demo.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every Ray process started from here stays on 127.0.0.1 (see README, "Ray on one machine").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test lint bench bench-gpu gpu-smoke bench-knn shards verify demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null))) || \
	  echo "note: Debian's dataset-fashion-mnist is not installed; the demo falls back to the bundled photos"; \
	fi
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check cast jobs data_tools tests benchmarks

bench: install
	$(PY) -m benchmarks.model
	$(PY) -m benchmarks.superpixels
	$(PY) -m benchmarks.data
	$(PY) -m benchmarks.dense

# on a CUDA machine: CAST-S vs ViT-S/16 (bf16, eager and compiled), slic_torch, end-to-end MoCo step;
# without a GPU both targets say so and exit 0
bench-gpu: install
	$(PY) -m benchmarks.gpu bench

# two short `ray job submit` runs on the local GPUs (NCCL, SyncBN, bf16, slic_torch on CUDA, compile off/on)
gpu-smoke: install
	$(PY) -m benchmarks.gpu smoke

# SEEDS vs seeds_fast: short MoCo runs of cast_tiny, kNN accuracy of each (about 20 min per seed on 2 cores)
bench-knn: install
	$(PY) -m benchmarks.superpixel_knn --seeds 0 1 2 3

# make shards SRC=/data/imagenet/train DEST=s3://bucket/imagenet/train LAYOUT=imagefolder
LAYOUT ?= imagefolder
SHARD_ARGS ?=
shards: install
	$(PY) -m data_tools.make_shards --src "$(SRC)" --dest "$(DEST)" --layout $(LAYOUT) $(SHARD_ARGS)

verify: install
	$(PY) -m data_tools.verify_shards "$(DEST)"

demo: install
	$(PY) -m jobs.demo

clean:
	rm -rf demo_out .pytest_cache
