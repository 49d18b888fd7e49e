# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv from the lock file when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo broker's port: make demo PORT=9090
PORT ?= 8080

.PHONY: venv demo test lint typecheck check lock bench clean

$(BIN)/.installed: requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed  ## start the broker with embedded Redis and a demo authorization server (PORT=8080)
	@$(BIN)/token-broker dev --port $(PORT)

test: $(BIN)/.installed  ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

check: lint typecheck test

lock:  ## re-resolve both lock files from pyproject.toml (needs uv)
	uv pip compile pyproject.toml --python-version 3.11 --generate-hashes -o requirements.lock
	uv pip compile pyproject.toml --extra dev --extra bench --python-version 3.11 --generate-hashes -o requirements-dev.lock

bench: $(BIN)/.installed  ## the benchmark suite, about 14 minutes on 2 cores (BENCH_ARGS=--quick: shorter): bench/results/latest.{json,png}
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q wrk; }; }
	@command -v wrk >/dev/null || { echo "make bench needs wrk: apt-get install wrk" >&2; exit 1; }
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
