# One command per habit. `make test` and `make demo` create the venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install format lint typecheck test test-all all demo bench bench-limiter bench-fairshare bench-redis-cost bench-cluster bench-failover bench-enqueue bench-request-bytes bench-fragment-cpu bench-perf bench-batch bench-soak bench-webhooks bench-resume bench-deep-queue bench-ttft bench-gateway bench-relay-rate chaos clean check-redis screenshots

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
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Both cover the whole tree, bench/ and tests/ included: ruff runs over `.`, and mypy checks the
# packages pyproject.toml [tool.mypy] lists (strict; tests/ with unannotated defs allowed).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# Two test processes, a file at a time each (a file's fixtures stay in one process), then the few tests
# marked serial (timing another process beside them would upset) alone.
test: install check-redis
	$(BIN)/pytest -n 2 --dist loadfile -m "not serial" --durations=15
	$(BIN)/pytest -m serial --durations=5

# The slow tests too (long streams, process kills).
test-all: install check-redis
	MOONQ_SLOW=1 $(BIN)/pytest -n 2 --dist loadfile -m "not serial"
	MOONQ_SLOW=1 $(BIN)/pytest -m serial

all: lint typecheck test

demo: install check-redis
	$(BIN)/moonq demo

# Every benchmark in turn (about an hour on 2 cores: the relay-rate run alone takes ~25 minutes); each rewrites its own section of BENCHMARKS.md.
# The web console's screenshots in docs/console/ (docs/console.md), taken by its browser tests.
screenshots: install check-redis
	MOONQ_SCREENSHOTS=1 $(BIN)/pytest -q tests/test_console_web.py

bench: bench-limiter bench-fairshare bench-redis-cost bench-cluster bench-failover bench-enqueue bench-request-bytes bench-fragment-cpu bench-perf bench-batch bench-soak bench-webhooks bench-resume bench-deep-queue bench-ttft bench-gateway bench-relay-rate

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# Fleet rate limits, moonq vs Celery's per-worker rate_limit (~6 minutes).
bench-limiter: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.limiter

# Fair share between tenants and two accounts, in the limiter itself (~8 minutes, time scaled by 1/10).
bench-fairshare: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.fairshare

# Redis commands and CPU per job and per relayed fragment (~2 minutes; docs/scaling.md uses them).
bench-redis-cost: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.redis_cost --followers --paced-jobs 100 --paced-ms 20

# How the Redis load spreads over a 3-primary Redis Cluster's shards, vs one plain Redis (~3 minutes).
bench-cluster: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.cluster_spread

# Redis bytes per queued job vs the request's bytes, 1 KB to 10 MB; the old full-envelope message as baseline (~1 minute).
bench-request-bytes: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.request_bytes

# The node's CPU per relayed fragment on paced streams (20 ms apart), beside 5454059's node (before issue 15's
# uvloop and job-start work) and direct httpx and aiohttp readers (~3 minutes).
bench-fragment-cpu: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.fragment_cpu --baseline 5454059

# Sentinel failover under streaming jobs: 10 primary kills (~2 minutes).
bench-failover: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.failover

# submit one by one vs submit_many, beside f27dc10's producer (before issue 15's enqueue work) (~2 minutes).
bench-enqueue: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.enqueue --baseline f27dc10

# One node: in-flight capacity, relay latency, per-job overhead, memory, Redis cost (~5 minutes; PNGs in bench/plots).
bench-perf: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.perf

# moonq batch on a 50,000-line file: peak memory vs a 5,000-line one (~6 minutes).
bench-batch: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.batch

# Soak: 3,000 jobs with 20% upstream faults through one node; Redis and node memory at the start, the peak
# and once the jobs' keys have expired (~2.5 minutes).
bench-soak: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.soak

# Webhooks: delivery latency after the job's end (p50/p99 at 1,000 jobs) and job throughput with webhooks on
# vs off, medians of 5 rounds (~2 minutes).
bench-webhooks: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.webhooks

# Resumed streams: tokens billed and time to the final answer, MOONQ_RESUME=partial vs restart, at a 20%
# stream-fault rate (drop, truncate, stall), the same fault scripts for both, medians of 3 rounds (~2 minutes).
bench-resume: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.resume

# Deep queues: Redis memory per waiting job, enqueue and drain rates, /metrics scrape and `moonq top` refresh
# times with 1,000, 10,000 and 100,000 jobs waiting, each beside the 1,000 baseline (~5 minutes).
bench-deep-queue: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.deep_queue

# Time to first token: 200 streams at once through the gateway and one node vs direct, beside the
# gateway and node of 5454059 (before the job-start work of issue 15), and through two nodes, in the same
# rounds (~2 minutes).
bench-ttft: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.ttft --baseline 5454059 --two-nodes

# The gateway for thousands: 2,000 streams through one `moonq gateway` (Redis connections, memory per
# client, TTFB/end vs direct) and 200 streams direct vs gateway vs the LiteLLM proxy (pip-installed into
# .bench/litellm-venv on first use, never a dependency) (~8 minutes).
bench-gateway: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.gateway_load

# Relay at a realistic rate: how many 50 tokens/s streams one node holds at <= 80% of a core, relay p50/p99
# (~25 minutes on a shared machine: it waits for the load average before each run).
bench-relay-rate: $(BENCH_STAMP) check-redis
	$(BIN)/python -m bench.relay_rate --baseline 6a3e92a

# The nemesis: 10 seeds x 500 jobs through three real nodes while faults strike (kills, pauses past the
# visibility timeout, clock skew, Redis restarts and pauses, cut and black-holed links), each seed checked
# over its whole history (tests/nemesis/); prints each seed and writes BENCHMARKS.md's Chaos section
# (several minutes per seed; logs in .bench/chaos/). Needs libfaketime for the clock faults (.ci/run installs it).
chaos: install check-redis
	$(BIN)/python -m tests.nemesis.run --seeds 10 --jobs 500

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
