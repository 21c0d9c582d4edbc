# Two entry points: `make demo` and `make test`. Each creates the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
CONVERT_VENV := .venv-convert
# anomalib, for the peer comparison only (benchmarks/compare_anomalib.py): never a dependency of ours.
ANOMALIB_VENV := .venv-anomalib
# The exported-model runner's own environment: numpy, Pillow and the runtimes, no torch (`make test-runtime`).
RUNTIME_VENV := .venv-runtime
RUNTIME_SPEC ?= numpy pillow onnxruntime openvino
# The oldest supported environment: pyproject.toml's floors, pinned (scripts/floor_requirements.py), on the
# oldest supported Python (`make test-floor`). The floor torch comes from PyPI: on Linux the CUDA build, about
# 3.4 GB to download and 6 GB installed.
FLOOR_VENV := .venv-floor
FLOOR_PYTHON ?= python3.11
ANOMALIB_SPEC ?= anomalib[clip]==2.7.0
# torch first, so nothing else pulls another build. 2.13.0 lies on these machines' disk as the CPU build; from
# PyPI on an ordinary Linux machine it is the CUDA build (a multi-GB download): pass TORCH_SPEC to choose, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU one.
TORCH_SPEC ?= torch==2.13.0
# The converter parity tests need open_clip, which needs torchvision: its own environment keeps them
# out of the core install. PyPI's torchvision 0.28 does not load on the core's CPU torch 2.13 ("operator
# torchvision::nms does not exist", measured), so this environment takes PyPI's torch 2.14.1 with its
# torchvision (a CUDA build: minutes to install, while the core suite runs).
CONVERT_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ANOMALIB_TORCH_SPEC ?= $(CONVERT_TORCH_SPEC)
# No byte-compiling of every installed module (torch's thousands): the few a run imports compile on import.
PIP_INSTALL := pip install --quiet --no-compile
# The core suite's pytest-xdist workers (one torch thread each: tests/conftest.py); 0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: install install-core install-convert install-anomalib install-runtime install-floor compare-anomalib demo test test-core test-slow test-convert test-runtime test-floor e2e lint cli-docs clean

# The core install (torch and hf-fsad's own dependencies): what `make demo` and `make cli-docs` need.
$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/$(PIP_INSTALL) $(TORCH_SPEC)
	$(VENV)/bin/$(PIP_INSTALL) -e .
	touch $@

# Every extra but `convert` (diffusers, onnx and openvino, gradio, playwright, ...): what the tests need.
$(VENV)/.installed: $(VENV)/.installed-core
	$(VENV)/bin/$(PIP_INSTALL) -e '.[dev,elpv,diffusers,space,export,ray]'
	touch $@

$(CONVERT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_VENV)/bin/$(PIP_INSTALL) $(CONVERT_TORCH_SPEC)
	$(CONVERT_VENV)/bin/$(PIP_INSTALL) -e '.[convert,dev]'
	touch $@

$(ANOMALIB_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/$(PIP_INSTALL) $(ANOMALIB_TORCH_SPEC)
	$(ANOMALIB_VENV)/bin/$(PIP_INSTALL) '$(ANOMALIB_SPEC)'
	$(ANOMALIB_VENV)/bin/$(PIP_INSTALL) -e .
	touch $@

$(RUNTIME_VENV)/.installed:
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/$(PIP_INSTALL) $(RUNTIME_SPEC)
	touch $@

$(FLOOR_VENV)/.installed: pyproject.toml scripts/floor_requirements.py
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PYTHON) scripts/floor_requirements.py > $(FLOOR_VENV)/floor-requirements.txt
	$(FLOOR_VENV)/bin/$(PIP_INSTALL) -r $(FLOOR_VENV)/floor-requirements.txt -e .
	touch $@

install-core: $(VENV)/.installed-core
install: $(VENV)/.installed
install-convert: $(CONVERT_VENV)/.installed
install-anomalib: $(ANOMALIB_VENV)/.installed
install-runtime: $(RUNTIME_VENV)/.installed
install-floor: $(FLOOR_VENV)/.installed

# hf_fsad's WinCLIP against anomalib's on the same random backbone (benchmarks/results/anomalib_comparison.md).
compare-anomalib: install-anomalib
	$(ANOMALIB_VENV)/bin/python benchmarks/compare_anomalib.py --out benchmarks/results

demo: install-core
	$(VENV)/bin/hf-fsad demo --out demo_output

# `--dist loadgroup`: tests marked `xdist_group` run on one worker.
test-core: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m 'not slow and not convert and not runtime' \
		--durations=25

# The long runs (torchrun, OpenVINO conversions, killed and resumed runs): CI runs them after `make test`.
test-slow: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m slow

# Only the files with converter tests: this environment lacks the other extras, whose absence fails their
# tests (at collection, for test modules that import an extra).
CONVERT_TESTS := $(shell grep -l 'mark.convert' tests/test_*.py)
test-convert: install-convert
	$(CONVERT_VENV)/bin/python -m pytest -q -m convert $(CONVERT_TESTS)

# The runner of an exported model (hf_fsad/deploy/run_exported.py) run with the torch-free interpreter.
test-runtime: install install-runtime
	HF_FSAD_RUNTIME_PYTHON=$(RUNTIME_VENV)/bin/python $(VENV)/bin/python -m pytest -q -m runtime tests/test_export.py tests/test_export_tiling.py

# The convert and runtime environments install while the core suite runs (pip mostly waits on the disk and
# the network), then their tests run.
test: install
	$(MAKE) --no-print-directory -j3 test-core install-convert install-runtime
	$(MAKE) --no-print-directory test-convert test-runtime

# Not part of `test` (a large download): import and score one image at the declared floors; .ci/run runs it.
test-floor: install-floor
	$(FLOOR_VENV)/bin/python scripts/floor_check.py

# The Space in headless Chromium (also part of test-core); refreshes the screenshot in the docs.
e2e: install
	HF_FSAD_SCREENSHOT=docs/space_screenshot.png $(VENV)/bin/python -m pytest -q -m e2e

lint: install
	$(VENV)/bin/ruff check src tests benchmarks training spaces scripts

# docs/cli.md from the CLI's parser (tests/test_cli.py fails when they disagree).
cli-docs: install-core
	$(VENV)/bin/python scripts/cli_reference.py

clean:
	rm -rf $(VENV) $(CONVERT_VENV) $(ANOMALIB_VENV) $(RUNTIME_VENV) $(FLOOR_VENV) demo_output
