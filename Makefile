# Every target that runs code depends on the venv, so a fresh clone needs nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint format profile

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

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

PROFILE_ARGS ?=
profile: $(STAMP)  ## params/GMACs table: baseline, SE, CBAM on ResNet-18/50 at 224 (PROFILE_ARGS=... to change)
	$(PY) -m bench.profile $(PROFILE_ARGS)
