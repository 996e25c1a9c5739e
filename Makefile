# landmark3d — two set-up commands on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install torch==2.13.0 (CPU wheel) *before* the package,
# so no unpinned torch requirement can pull a CUDA build. A stamp file makes a second run
# install nothing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.landmark3d-installed
TORCH := torch==2.13.0

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/landmark3d demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_detector.py
	$(PY) benchmarks/bench_ablation.py
	$(PY) benchmarks/bench_suite.py --reuse
	$(PY) benchmarks/bench_confidence.py
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
