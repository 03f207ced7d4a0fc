# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in $(VENV) and install the package into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch is installed first, pinned, so that the package's unpinned `torch`
# requirement is already satisfied and pip pulls no CUDA wheels. Override on other machines,
# e.g. `make test TORCH_SPEC=torch` or TORCH_SPEC= to skip this step.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The built-in example end to end on a local Dask cluster: summary and PNG plots in demo_output/.
demo: $(STAMP)
	$(PY) -m cryolike_dask demo --output demo_output

test: $(STAMP)
	$(PY) -m ruff check cryolike_dask tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check cryolike_dask tests benchmarks
	$(PY) -m ruff format --check cryolike_dask tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_output
