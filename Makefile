# One command per habit. `make test` and `make demo` create the venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install format lint typecheck test test-all all demo bench clean check-redis

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

check-redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server is not on PATH. Install it: 'sudo apt-get install redis-server' (Debian/Ubuntu)"; \
	  echo "or 'brew install redis' (macOS); the tests and the demo start their own private instance."; \
	  exit 1; }

format: install
	$(BIN)/ruff format worker producers simulator tests
	$(BIN)/ruff check --fix worker producers simulator tests

lint: install
	$(BIN)/ruff check worker producers simulator tests

typecheck: install
	$(BIN)/mypy

test: install check-redis
	$(BIN)/pytest

# The slow tests too (long streams, process kills).
test-all: install check-redis
	MOONQ_SLOW=1 $(BIN)/pytest

all: lint typecheck test

demo: install check-redis
	$(BIN)/moonq demo

# Fleet rate limits, moonq vs Celery's per-worker rate_limit (about 6 minutes); writes BENCHMARKS.md.
bench: install check-redis
	$(BIN)/python -m bench.limiter
	$(BIN)/python -m bench.enqueue

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
