# Every target that runs code depends on the venv, so a fresh clone needs nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# make sweep / wandb-sweep: which ablation (experiments/ablation/*.yaml), protocol, seeds.
ABLATION   ?= cbam_arrangement
PROTOCOL   ?= smoke
SEEDS      ?= 0
SWEEP_ARGS ?=
# make train: Hydra overrides, e.g. TRAIN_ARGS='attention=cbam seed=1'
TRAIN_ARGS ?=
PROFILE_ARGS ?=
# make tables: e.g. TABLES_ARGS='--runs outputs/smoke-runs --out /tmp/tables'
TABLES_ARGS ?=
# make bench: e.g. BENCH_ARGS='--quick' or '--sections model'
BENCH_ARGS ?=
# make gpu-check: e.g. GPU_CHECK_ARGS='--compile none,se' or '--dry-run'
GPU_CHECK_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test lint format profile paper-costs train sweep wandb-sweep \
        wandb-sync tables costs bench cpu-protocol gpu-check figures notebooks

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

test: $(STAMP)  ## run the test suite (CPU only, a few minutes)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

profile: $(STAMP)  ## params/GMACs: ResNet-18/50 baseline, +SE, +CBAM at 224 beside CBAM Table 4 (PROFILE_ARGS=--help)
	$(PY) -m bench.profile $(PROFILE_ARGS)

paper-costs: $(STAMP)  ## reproduce the papers' params/GFLOPs columns (CBAM T4, SENet T2/T10/T13, ECA)
	$(PY) -m pytest -q tests/test_paper_costs.py

train: $(STAMP)  ## one training run (default: ResNet-20, offline CIFAR-10, cpu protocol); TRAIN_ARGS=...
	$(PY) -m bench.train $(TRAIN_ARGS)

sweep: $(STAMP)  ## run one ablation, resumable: ABLATION=... PROTOCOL=smoke|cpu|cifar|imagenet SEEDS=0,1 SWEEP_ARGS=...
	$(PY) -m bench.sweep $(ABLATION) --protocol $(PROTOCOL) --seeds $(SEEDS) $(SWEEP_ARGS)

wandb-sweep: $(STAMP)  ## W&B grid sweep file sweeps/$(ABLATION).yaml; needs a real PROTOCOL=cpu|cifar|imagenet
	$(PY) -m bench.sweep $(ABLATION) --protocol $(PROTOCOL) --seeds $(SEEDS) \
		--wandb-sweep sweeps/$(ABLATION).yaml $(SWEEP_ARGS)

wandb-sync: $(STAMP)  ## upload every offline W&B run under outputs/ (needs `wandb login` once)
	@runs=$$(find outputs -type d -name 'offline-run-*' 2>/dev/null); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under outputs/"; exit 0; fi; \
	for run in $$runs; do $(VENV)/bin/wandb sync "$$run" || exit 1; done

tables: $(STAMP)  ## results/runs/**.json -> results/tables/*.{md,csv,tex,png} + results/README.md (TABLES_ARGS=...)
	$(PY) -m bench.tables $(TABLES_ARGS)

costs: $(STAMP)  ## params/GMACs of every ablation variant without training -> cost records + tables
	$(PY) -m bench.costs

bench: $(STAMP)  ## speed report against timm, and the cpu protocol's loop -> results/bench/cpu.{md,csv} (~8 min on a quiet 2-core machine, up to ~20 under load; BENCH_ARGS=--quick)
	$(PY) -m bench.speed $(BENCH_ARGS)

cpu-protocol: $(STAMP)  ## the cpu protocol's own benchmark: ResNet-20 on the full CIFAR-10, ~13 min on 2 cores (the baseline run of cifar_blocks, same id)
	$(PY) -m bench.train ablation=cifar_blocks protocol=cpu attention=none seed=0

gpu-check: $(STAMP)  ## one GPU, <8 min: speed report + a cifar_fast run -> results/bench/gpu-<device>.md (GPU_CHECK_ARGS=--dry-run on a CPU)
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

figures: $(STAMP)  ## the papers' pictures from the committed weights and records -> results/figures/*.png
	$(PY) -m bench.figures

notebooks: $(STAMP)  ## execute notebooks/*.ipynb headless, in place (outputs of the committed runs)
	$(PY) -m bench.figures notebooks
