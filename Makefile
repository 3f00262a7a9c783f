# incountry-proxy: `make run` tries it against the bundled sandbox, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROXY_PORT ?= 8080
SANDBOX_PORT ?= 9000
export PROXY_PORT SANDBOX_PORT

.PHONY: install install-test run test soak lint typecheck check-config clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Start the sandbox and the proxy against it; Ctrl-C stops both.
run: install
	@BIN=$(BIN) scripts/run-sandbox.sh

lint: install-test
	$(BIN)/ruff check proxy tests scripts

typecheck: install-test
	$(BIN)/mypy

## The whole suite: lint, strict typing, then every test over loopback.
test: install-test
	$(BIN)/ruff check proxy tests scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

## Ten minutes of mixed traffic with faults switching on and off (not part of `make test`).
SOAK_SECONDS ?= 600
soak: install-test
	$(BIN)/python scripts/soak.py --duration $(SOAK_SECONDS) --report soak-report.json

check-config: install
	$(BIN)/incountry-proxy check-config --config $(or $(CONFIG),config/incountry.yaml)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
