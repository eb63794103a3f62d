# Two commands for a fresh machine: `make demo` and `make test`. Every target installs what it needs.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
NPROC_DEMO ?= 2

.PHONY: venv demo test mutation test-gpu-stack lint bench gpu-check docker-check slurm-up slurm-status slurm-down clean

# The venv is rebuilt only when its inputs change (pyproject.toml or this Makefile's pins).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dali,dev,plot,trackers]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

venv: $(STAMP)

# The lent GPU machines run Triton 3.6, this venv 3.8: the interpreter tests run the kernels on both (test only).
TRITON_OLD := $(VENV)/triton-3.6
$(TRITON_OLD)/.stamp: $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(TRITON_OLD) triton==3.6.0
	touch $@

demo: venv
	$(PY) -m mixmo_dist.data.demo --out data/demo
	bash scripts/launch_demo.sh

test: venv $(TRITON_OLD)/.stamp
	bash scripts/test.sh

# Mutation testing (mutmut 3) of the modules where a bug changes numbers silently; one module at a time, each with
# its own fast in-process tests (scripts/mutation.py). Not part of `make test`: a full pass takes up to 90 minutes.
# MODULES="training/loss ops/mixing" limits it; results are kept in mutants/ and a rerun tests only what changed.
mutation: venv
	$(PY) scripts/mutation.py $(MODULES)

# The lent GPU machines' stack (torch 2.11, Triton 3.6; no DALI, no submitit) on CPU, to catch API drift before a
# GPU session pays for it. Downloads ~4 GB from PyPI into its own venv; not part of `make test`.
GPU_STACK := .venv-gpu-stack
$(GPU_STACK)/.stamp:
	test -x $(GPU_STACK)/bin/python || $(PY_SYS) -m venv $(GPU_STACK)
	$(GPU_STACK)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm accelerate \
		pyyaml safetensors numpy pillow tensorboard pytest pytest-timeout
	touch $@

test-gpu-stack: $(GPU_STACK)/.stamp
	PYTHONPATH=. OMP_NUM_THREADS=2 $(GPU_STACK)/bin/python -m pytest -q -p no:cacheprovider -m "not slurm" \
		--ignore=tests/test_slurm.py --ignore=tests/test_benchmarks.py tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: venv
	$(PY) -m benchmarks.run_all

gpu-check:
	bash scripts/gpu_check.sh

# Builds docker/Dockerfile with podman/buildah on a local Debian base and runs the image (demo, evaluate, 2 ranks);
# needs root and ~14 GB of disk; not part of `make test`. MIXMO_DOCKER_KEEP=1 keeps the image. See docs/DOCKER.md.
docker-check:
	bash scripts/docker_check.sh

slurm-up:
	bash scripts/slurm_cluster.sh start

slurm-status:
	bash scripts/slurm_cluster.sh status

slurm-down:
	bash scripts/slurm_cluster.sh stop

clean:
	rm -rf runs data/demo
