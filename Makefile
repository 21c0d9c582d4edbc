# Two entry points: `make demo` and `make test`. Each creates the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
CONVERT_VENV := .venv-convert
# anomalib, for the peer comparison only (benchmarks/compare_anomalib.py): never a dependency of ours.
ANOMALIB_VENV := .venv-anomalib
# The exported-model runner's own environment: numpy, Pillow and the runtimes, no torch (`make test-runtime`).
RUNTIME_VENV := .venv-runtime
RUNTIME_SPEC ?= numpy pillow onnxruntime openvino
ANOMALIB_SPEC ?= anomalib[clip]==2.7.0
# CPU build of torch that lies on these machines' disk; installed first so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The converter parity tests need open_clip, which needs torchvision: its own environment keeps them
# out of the core install.
CONVERT_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-convert install-anomalib install-runtime compare-anomalib demo test test-core test-convert test-runtime e2e lint cli-docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/pip install --quiet -e '.[dev,elpv,diffusers,space,export]'
	touch $@

$(CONVERT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_VENV)/bin/pip install --quiet $(CONVERT_TORCH_SPEC)
	$(CONVERT_VENV)/bin/pip install --quiet -e '.[convert,dev]'
	touch $@

$(ANOMALIB_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/pip install --quiet $(CONVERT_TORCH_SPEC)
	$(ANOMALIB_VENV)/bin/pip install --quiet '$(ANOMALIB_SPEC)'
	$(ANOMALIB_VENV)/bin/pip install --quiet -e .
	touch $@

$(RUNTIME_VENV)/.installed:
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install --quiet $(RUNTIME_SPEC)
	touch $@

install: $(VENV)/.installed
install-convert: $(CONVERT_VENV)/.installed
install-anomalib: $(ANOMALIB_VENV)/.installed
install-runtime: $(RUNTIME_VENV)/.installed

# hf_fsad's WinCLIP against anomalib's on the same random backbone (benchmarks/results/anomalib_comparison.md).
compare-anomalib: install-anomalib
	$(ANOMALIB_VENV)/bin/python benchmarks/compare_anomalib.py --out benchmarks/results

demo: install
	$(VENV)/bin/hf-fsad demo --out demo_output

test-core: install
	$(VENV)/bin/python -m pytest -q

# Only the files with converter tests: this environment lacks the other extras, whose absence fails their
# tests (at collection, for test modules that import an extra).
CONVERT_TESTS := $(shell grep -l 'mark.convert' tests/test_*.py)
test-convert: install-convert
	$(CONVERT_VENV)/bin/python -m pytest -q -m convert $(CONVERT_TESTS)

# The runner of an exported model (hf_fsad/deploy/run_exported.py) run with the torch-free interpreter.
test-runtime: install install-runtime
	HF_FSAD_RUNTIME_PYTHON=$(RUNTIME_VENV)/bin/python $(VENV)/bin/python -m pytest -q -m runtime tests/test_export.py tests/test_export_tiling.py

test: test-core test-convert test-runtime

# The Space in headless Chromium (also part of test-core); refreshes the screenshot in the docs.
e2e: install
	HF_FSAD_SCREENSHOT=docs/space_screenshot.png $(VENV)/bin/python -m pytest -q -m e2e

lint: install
	$(VENV)/bin/ruff check src tests benchmarks training spaces scripts

# docs/cli.md from the CLI's parser (tests/test_cli.py fails when they disagree).
cli-docs: install
	$(VENV)/bin/python scripts/cli_reference.py

clean:
	rm -rf $(VENV) $(CONVERT_VENV) $(ANOMALIB_VENV) $(RUNTIME_VENV) demo_output
