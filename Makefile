# The contributor contract: `make test` installs what the tests need and runs them;
# `make bench` runs the quantization benchmark. Both use a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch wheel on the CI/dev machines; the GPU machines bring their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test test lint bench gpu-wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC) .

install-test: $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC) -e '.[test]'

lint: install-test
	$(VENV)/bin/ruff check .

test: install-test lint
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/thunderkv bench quant

# What benchmarks/gpu_check.sh needs that the offline GPU image lacks (carry wheels/ along).
# What gpu_check.sh needs beyond the GPU image (Python 3.12, offline): the UCX wheel, pinned,
# for that Python, and the commit the carried tree is at (the tree travels without .git).
gpu-wheels: $(PY)
	rm -f wheels/libucx*.whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d wheels 'libucx-cu13==1.22.0'
	git rev-parse --short=12 HEAD | tr -d '\n' > wheels/GIT_SHA
	[ -z "$$(git status --porcelain)" ] || printf -- '-dirty' >> wheels/GIT_SHA

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
