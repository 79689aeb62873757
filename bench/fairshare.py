"""Fair share between tenants in the fleet limiter: admitted ratio vs weights, and a lone tenant's use.

    python -m bench.fairshare [--rpm L] [--window-s W] [--rounds N] [--no-write]

Several processes' limiters (``worker/ratelimit.py``, each its own ``Limiter`` with its own id, as
each node process has) share one private redis-server and one fleet quota of L requests per
sliding window; every tenant keeps more calls waiting than the quota admits (each process holds a
backlog per tenant and tops it up), so the quota, not the supply, decides. Each grant is held 20 ms.

Time is scaled: the limiter's window is W (default 6.15 s, a tenth of the real 61.5 s) and the
quota L per W/1.025, the upstream's minute scaled alike, so one run takes seconds, not minutes. The
limiter's arithmetic does not depend on the scale; only Redis round trips (about 0.3 ms) are not scaled.

Cases, each ``--rounds`` times (medians reported):

* weights 1:3 (two tenants) and 1:1:2 (three): each tenant's share of the grants over three windows
  after the first, vs its weight's share; the baseline is the same supply with no tenants (every
  call in the default tenant, the limiter before tenants): grants then follow arrival order.
* a lone tenant (weight 1, others configured but idle): grants over three steady windows / the
  quota over the same (scaled) minutes: the work-conserving figure (>= 97% is the goal).
* two accounts whose quotas add up to L (2/3 and 1/3 of it), tenants 1:3: combined use of the sum of
  their quotas, and the shares.
* through the queue (real time; ``--no-e2e`` skips it): one ``celery -A worker worker`` node
  (``MOONQ_CONCURRENCY=40``, ``MOONQ_MAX_INFLIGHT=8``) against the simulator allowing 8 concurrent
  calls; 1,500 jobs of tenant a are submitted, then 1,500 of b, so a's flood is ahead of b's and far
  deeper than the node's concurrency. Jobs finished per tenant over 30 s after a 5 s warm-up.
  Baseline: the same without a tenants file (one queue, one line: the limiter before tenants).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from redis.asyncio import Redis

from bench.fleets import API_KEY, clean_env
from bench.report import write_section
from harness import RedisServer, WorkerProcess
from moonq.record import JobField
from moonq.settings import ClientSettings
from producers import Client
from simulator import SimConfig, SimServer
from worker.limiter_state import LimiterKeys
from worker.ratelimit import Limiter, Limits, Share

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Fair share between tenants"
HOLD_S = 0.02
PROCESSES = 2
BACKLOG = 100  # waiting calls each process keeps per tenant: more than a window grants any tenant


async def run_case(
    redis_url: str,
    weights: dict[str, int],
    active: list[str],
    rpm: int,
    window_ms: int,
    tenants: bool,
    accounts: dict[str, int] | None = None,
) -> tuple[Counter[str], float]:
    """Grants per tenant over three windows after the first, and the seconds those windows took."""
    redis = Redis.from_url(redis_url)
    prefix = f"fs{uuid.uuid4().hex[:8]}"
    shares = {name: Share(weight=w) for name, w in weights.items()} if tenants else None
    pool = {name: Limits(rpm=quota) for name, quota in accounts.items()} if accounts else None
    limits = Limits(window_ms=window_ms) if pool else Limits(rpm=rpm, window_ms=window_ms)
    lims = [Limiter(redis, prefix, limits, accounts=pool, tenants=shares) for _ in range(PROCESSES)]
    for lim in lims:
        lim.start()
    grants: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def wake_all() -> None:
        async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(LimiterKeys.for_prefix(prefix).wake)
            async for _ in pubsub.listen():
                if stop.is_set():  # not only the cancel: redis-py loses one at times (worker/ratelimit.py)
                    return
                for lim in lims:
                    lim.wake()

    async def caller(lim: Limiter, tenant: str) -> None:
        while not stop.is_set():
            lease = await lim.acquire(1, priority=5, enqueued_at_s=time.time(), tenant=tenant if tenants else "default")
            grants.append((time.monotonic(), tenant))
            await asyncio.sleep(HOLD_S)
            await lim.release(lease, used_tokens=None)

    listener = asyncio.create_task(wake_all())
    tasks = [asyncio.create_task(caller(lim, t)) for lim in lims for t in active for _ in range(BACKLOG)]
    window_s = window_ms / 1000
    start = time.monotonic()
    await asyncio.sleep(window_s * 4 + 0.2)
    stop.set()
    for task in [*tasks, listener]:
        task.cancel()
    await redis.publish(LimiterKeys.for_prefix(prefix).wake, "stop")  # the listener sees the flag
    await asyncio.wait([*tasks, listener], timeout=10)
    for lim in lims:
        await asyncio.wait_for(lim.stop(), 10)
    await redis.aclose()
    counted = Counter(t for at, t in grants if start + window_s <= at < start + 4 * window_s)
    return counted, 3 * window_s


E2E_JOBS = 1500  # per tenant: more than the measured time takes of either, so neither runs out
E2E_INFLIGHT = 8  # the account's concurrent calls: the quota the through-the-queue cases saturate
E2E_WARMUP_S = 5.0
E2E_WINDOW_S = 30.0


def run_e2e(redis_url: str, tenants: bool, tmp: Path) -> tuple[Counter[str], float]:
    """Jobs finished per tenant in the measured minute, through the broker and a real node."""
    prefix = f"fe{uuid.uuid4().hex[:6]}"
    tenants_file = ""
    if tenants:
        weights = {"a": 1, "b": 3}
        (tmp / "tenants.json").write_text(
            json.dumps({"tenants": {name: {"tokens_sha256": [], "weight": w} for name, w in weights.items()}})
        )
        tenants_file = str(tmp / "tenants.json")
    settings = ClientSettings(redis_url=redis_url, prefix=prefix, tenants_file=tenants_file)
    owner: dict[str, str] = {}
    for name in ("a", "b"):  # a's whole flood first
        request = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": f"from {name}"}]}
        with Client(settings=settings, **({"tenant": name} if tenants else {})) as client:
            for job in client.submit_many([request] * E2E_JOBS):
                owner[job.id] = name
    with SimServer(SimConfig(seed=9, first_token_latency_s=0.3, max_concurrency=E2E_INFLIGHT)) as sim:
        env = clean_env(
            {
                "REDIS_URL": redis_url,
                "MOONQ_PREFIX": prefix,
                "MOONSHOT_BASE_URL": sim.base_url,
                "MOONSHOT_API_KEY": API_KEY,
                "MOONQ_MAX_INFLIGHT": str(E2E_INFLIGHT),
                "MOONQ_CONCURRENCY": "40",
                "MOONQ_METRICS_PORT": "0",
                **({"MOONQ_TENANTS_FILE": tenants_file} if tenants else {}),
            }
        )
        with WorkerProcess(env):
            start = time.time()
            time.sleep(E2E_WARMUP_S + E2E_WINDOW_S + 2)
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    counted: Counter[str] = Counter()
    lo, hi = start + E2E_WARMUP_S, start + E2E_WARMUP_S + E2E_WINDOW_S
    pipe = r.pipeline(transaction=False)
    ids = list(owner)
    for job_id in ids:
        pipe.hget(settings.keys.job(job_id), JobField.FINISHED_AT)
    for job_id, at in zip(ids, pipe.execute(), strict=True):
        if at and lo <= float(at) < hi:
            counted[owner[job_id]] += 1
    r.close()
    return counted, E2E_WINDOW_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=120, help="L: grants per window (default 120)")
    parser.add_argument("--window-s", type=float, default=6.15, help="the limiter's window W, s (default 6.15)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the through-the-queue cases")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    window_ms = int(args.window_s * 1000)
    minute_s = args.window_s / 1.025  # the upstream's minute, scaled like the window
    two = {"main": args.rpm * 2 // 3, "spare": args.rpm - args.rpm * 2 // 3}
    cases: list[tuple[str, dict[str, int], list[str], bool]] = [
        ("1:3", {"a": 1, "b": 3}, ["a", "b"], True),
        ("1:3, no tenants (baseline)", {"a": 1, "b": 3}, ["a", "b"], False),
        ("1:1:2", {"a": 1, "b": 1, "c": 2}, ["a", "b", "c"], True),
        ("1:1:2, no tenants (baseline)", {"a": 1, "b": 1, "c": 2}, ["a", "b", "c"], False),
        ("lone tenant (1 of 1:3)", {"a": 1, "b": 3}, ["a"], True),
        (f"two accounts, {two['main']} + {two['spare']} per window, 1:3", {"a": 1, "b": 3}, ["a", "b"], True),
    ]
    rows: list[list[str]] = []
    with RedisServer() as server:
        for name, weights, active, tenants in cases:
            shares: dict[str, list[float]] = {t: [] for t in active}
            use: list[float] = []
            for _ in range(args.rounds):
                pool = two if name.startswith("two accounts") else None
                counted, took = asyncio.run(
                    run_case(server.url, weights, active, args.rpm, window_ms, tenants, accounts=pool)
                )
                total = sum(counted.values())
                for t in active:
                    shares[t].append(counted[t] / total if total else 0.0)
                use.append(total / (args.rpm * took / minute_s))
            total_w = sum(weights[t] for t in active)
            parts = []
            worst = 0.0
            for t in active:
                want, got = weights[t] / total_w, statistics.median(shares[t])
                worst = max(worst, abs(got - want) / want)
                parts.append(f"{t}: {got:.1%} (weight {want:.1%})")
            row = [name, "; ".join(parts), f"{worst:.1%}", f"{statistics.median(use):.1%}"]
            print(" | ".join(row), flush=True)
            rows.append(row)
        for tenants in (True, False) if args.e2e else ():
            with tempfile.TemporaryDirectory() as tmp:
                counted, took = run_e2e(server.url, tenants, Path(tmp))
            total = sum(counted.values())
            share = {"a": 0.25, "b": 0.75}
            seen = {t: counted[t] / total if total else 0.0 for t in share}
            worst = max(abs(seen[t] - share[t]) / share[t] for t in share)
            name = "through the queue, 1:3, a's flood first" if tenants else "through the queue, no tenants (baseline)"
            shares_text = "; ".join(f"{t}: {seen[t]:.1%} (weight {share[t]:.1%})" for t in share)
            row = [name, shares_text, f"{worst:.1%}", f"{total / took:.1f} jobs/s"]
            print(" | ".join(row), flush=True)
            rows.append(row)
    table = "\n".join(
        [
            "| case | share of grants, median (weight's share) | worst deviation from weight"
            " | quota used (through the queue: throughput) |"
        ]
        + ["|---|---|---|---|"]
        + ["| " + " | ".join(row) + " |" for row in rows]
    )
    text = (
        f"{SECTION}\n\n"
        f"`python -m bench.fairshare --rpm {args.rpm} --window-s {args.window_s} --rounds {args.rounds}`"
        f" ({PROCESSES} limiter processes sharing one redis-server, {BACKLOG} waiting calls per process and"
        f" tenant, grants held {HOLD_S * 1000:.0f} ms; time scaled: window {args.window_s} s standing for"
        " 61.5 s, quota L per window/1.025; medians of the rounds, counted over three windows after the first;"
        f" the through-the-queue rows: one run each, real time, {E2E_INFLIGHT} concurrent calls as the quota,"
        f" {E2E_JOBS} jobs per tenant, jobs finished in {E2E_WINDOW_S:.0f} s after a {E2E_WARMUP_S:.0f} s warm-up;"
        " their last column is throughput)."
        "\n\n" + table + "\n\n"
        "Without tenants (the limiter before this change) grants follow arrival order: every tenant's"
        " calls wait in one line, so the shares are the supply's, whatever the weights. Quota used is"
        " bounded by 60/61.5 = 97.6% (the limiter's window is 1.5 s longer than the upstream's minute); with"
        " two accounts it is of the sum of their quotas.\n"
        "Through the queue, each tenant's jobs wait in a queue of their own that the node takes in weighted"
        " turns (docs/tenants.md), so a flood deeper than the node's concurrency does not hold its slots.\n"
    )
    if not args.no_write:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
