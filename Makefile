# Everything the project needs is installed by `make venv` from pyproject.toml + requirements.lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNS ?= runs

.PHONY: venv test test-fast test-gpu-dry-run demo lint lock clean gpu-check

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Two workers, one per core; idle workers take tests from busy ones (the DDP and resume tests are long).
# The GPU check's CPU walk-through (about 5 minutes) has its own target, to keep this one under 10 minutes.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not gpu_dry_run"

test-gpu-dry-run: $(STAMP)
	$(PY) -m pytest -q -m gpu_dry_run

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not gpu_dry_run"

demo: $(STAMP)
	$(VENV)/bin/refvision demo --root $(RUNS)/demo

# The GPU check (benchmarks/gpu_check.py): the CUDA tests, then the benchmarks, everything written to
# $(OUT) (default $(RUNS)/gpu-check); about 8 minutes on one H100, one line and exit 1 without a CUDA
# device. On a machine whose Python already holds the dependencies: make gpu-check PY=python3
gpu-check: $(if $(filter command line,$(origin PY)),,$(STAMP))
	@$(PY) benchmarks/gpu_check.py --out "$(or $(OUT),$(RUNS)/gpu-check)"

# ruff (lint + format, configured in pyproject.toml) over the whole tree, hadolint over the Dockerfile.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint --failure-threshold style docker/Dockerfile

# Re-pin every transitive dependency after changing pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^refvision' > requirements.lock

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
