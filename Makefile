# Set-up is part of every entry point: a fresh machine needs only Python 3.10+ and the
# package registries. torch is installed first and pinned, so that nothing pulls another build.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.fwserve-installed

.PHONY: serve test install bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/fwserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m kernels.bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
