# The newcomer's commands. Each one builds a local virtual environment (.venv) on first use.
#   make train   train a small GPT on the default corpus (Python's own sources) and print a sample
#   make test    run the test suite (CUDA when present, else Triton's CPU interpreter), the transformers
#                integration's too: the environment gets the optional transformers extra
#   make mutants plant known bugs one at a time and report which the tests miss (minutes; not part of make test)
PYTHON ?= python3
VENV   := .venv
# torch 2.13.0 is the CPU wheel these machines carry. Triton 3.6 is what the GPU machines run, so the compile
# report and its test (registers and spills depend on the compiler version) check what ships there; its CPU
# interpreter needs numpy < 2.4.
PINS   ?= torch==2.13.0 triton==3.6.0 "numpy<2.4"

.PHONY: train test mutants
train: $(VENV)/installed
	$(VENV)/bin/gpt-train --preset cpu

test: $(VENV)/installed
	$(VENV)/bin/python -m pytest -q tests

mutants: $(VENV)/installed
	$(VENV)/bin/python tests/mutants.py

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(PINS) -e ".[test,transformers]"
	touch $@
