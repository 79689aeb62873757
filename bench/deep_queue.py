"""Deep queues: what each waiting job costs, and whether reading or draining the queue slows as it deepens.

    python -m bench.deep_queue [--depths 1000,10000,100000] [--rounds 3] [--deep-rounds N] [--no-write]

For each depth D, each round on a fresh private redis-server with no node consuming:

1. ``Client.submit_many`` enqueues D jobs (chunks of 10,000) of one small request: jobs/s, and the
   growth of Redis ``used_memory`` (INFO memory) per job;
2. the node's scrape-time reads with D waiting: ``worker.exporter.RedisCollector.collect()`` timed in
   this process, then an HTTP GET of a real node's ``/metrics``. That node listens on another queue
   (``-Q``), so it serves the gauges of the deep queue (its settings' queue) without consuming it;
3. one ``moonq top`` refresh with D waiting: ``Top.round()`` (discovery and the scrape of that node)
   plus ``Top.rows()`` (the screen's numbers), as each redraw does;
4. drain: a consuming node (100 jobs in flight, below every depth) against a zero-latency simulator;
   the rate at which jobs end, counted on the jobs' event channels: from the 200th ended job to the
   700th (the same window at every depth, clear of the smallest queue's last jobs, so comparable),
   and to the 5,000th where D holds that many (a longer, steadier window).

The smallest depth is the baseline: the report gives each figure's ratio at the largest depth to it.
Scrape and refresh times are medians of ``SAMPLES`` reads; every figure is the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.fleets import API_KEY, clean_env
from bench.perf import PREFIX, Ended, Sim, wait_until
from bench.report import line_plot, write_section
from console.top import Top
from harness import RedisServer, WorkerProcess, free_port, wait_for_port
from moonq.broker import QueueDepth
from moonq.settings import ClientSettings
from producers import Client
from worker.exporter import RedisCollector
from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Deep queues: cost per waiting job, 1,000 to 100,000"
REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "What is a queue, in one line?"}]}
CHUNK = 10_000
SAMPLES = 20
DRAIN_SKIP = 200  # jobs ended before the drain clock starts: the node's first prefetch and warm-up
DRAIN_HEAD = 700  # ends 300 short of the smallest depth: a queue's last jobs end in a burst (nothing new arrives)
DRAIN_CONCURRENCY = 100  # jobs in flight on the draining node, below every depth (the default 1,000 is not)
DRAIN_LONG = 5_000
IDLE_QUEUE = "bench-deep-idle"  # the metrics node consumes this (empty) queue, not the deep one
FIGURES = ("bytes_per_job", "enqueue_jobs_s", "collect_ms", "scrape_ms", "top_ms", "drain_jobs_s", "drain_long_jobs_s")
LABELS = {
    "bytes_per_job": "Redis `used_memory` per waiting job (bytes)",
    "enqueue_jobs_s": "enqueue, `submit_many` (jobs/s)",
    "collect_ms": "`RedisCollector.collect()`, in process (ms)",
    "scrape_ms": "HTTP GET of a node's `/metrics` (ms)",
    "top_ms": "`moonq top` refresh: `Top.round()` + `rows()` (ms)",
    "drain_jobs_s": "drain, one node, zero-latency upstream, jobs 200 to 700 (jobs/s)",
    "drain_long_jobs_s": "drain, the same, jobs 200 to 5,000 (jobs/s)",
}
# Where a larger figure is the worse one (a cost), the ratio reads as a slowdown; else as a speed ratio.
COSTS = {"bytes_per_job", "collect_ms", "scrape_ms", "top_ms"}


@dataclass
class Round:
    depth: int
    figures: dict[str, float]


def used_memory(client: Client) -> int:
    return int(client.redis.info("memory")["used_memory"])


def enqueue(client: Client, depth: int) -> tuple[float, float]:
    """(jobs/s, bytes of ``used_memory`` per job) for ``depth`` jobs in chunks of ``CHUNK``."""
    before = used_memory(client)
    t0 = time.perf_counter()
    left = depth
    while left:
        n = min(CHUNK, left)
        client.submit_many([REQUEST] * n)
        left -= n
    elapsed = time.perf_counter() - t0
    return depth / elapsed, (used_memory(client) - before) / depth


def median_ms(run: Callable[[], object], samples: int = SAMPLES) -> float:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def node_env(redis_url: str, base_url: str, metrics_port: int) -> dict[str, str]:
    return clean_env(
        {
            "MOONQ_CONCURRENCY": str(DRAIN_CONCURRENCY),
            "REDIS_URL": redis_url,
            "MOONQ_PREFIX": PREFIX,
            "MOONSHOT_BASE_URL": base_url,
            "MOONSHOT_API_KEY": API_KEY,
            "MOONQ_METRICS_PORT": str(metrics_port),
            "MOONQ_METRICS_HOST": "127.0.0.1",
        }
    )


def reads(redis_url: str, base_url: str, log_dir: Path, depth: int) -> dict[str, float]:
    """Scrape and refresh times with ``depth`` jobs waiting, from a node that does not consume them."""
    settings = Settings(redis_url=redis_url, prefix=PREFIX)
    collector = RedisCollector(settings)
    out = {"collect_ms": median_ms(lambda: list(collector.collect()))}
    port = free_port()
    worker = WorkerProcess(
        node_env(redis_url, base_url, port), args=("-n", "idle@bench", "-Q", IDLE_QUEUE), log_path=log_dir / "idle.log"
    )
    worker.env = node_env(redis_url, base_url, port)
    worker.start(wait=True)
    try:
        wait_for_port(port, timeout_s=20)
        url = f"http://127.0.0.1:{port}/metrics"
        with httpx.Client(trust_env=False, timeout=10) as http:
            text = http.get(url).text
            assert "moonq_queue_depth{queue=" in text, text[:500]
            out["scrape_ms"] = median_ms(lambda: http.get(url).raise_for_status())
        top = Top(ClientSettings(redis_url=redis_url, prefix=PREFIX), [url], interval_s=2.0)
        try:
            prev = top.round()

            def refresh() -> None:
                nonlocal prev
                cur = top.round()
                assert cur.nodes[url] is not None, "the node did not answer moonq top"
                top.rows(prev, cur)
                prev = cur

            out["top_ms"] = median_ms(refresh)
        finally:
            top.close()
    finally:
        worker.stop()
    waiting = QueueDepth(settings).read()
    assert waiting is not None and waiting >= depth, f"the idle node consumed the queue: {waiting} left of {depth}"
    return out


def drain(redis_url: str, base_url: str, log_dir: Path, depth: int) -> dict[str, float]:
    """jobs/s at which one consuming node ends jobs, from the ``DRAIN_SKIP``th to the ``DRAIN_HEAD``th and
    (when ``depth`` holds that many) to the ``DRAIN_LONG``th."""
    ended = Ended(redis_url)
    port = free_port()
    worker = WorkerProcess(
        node_env(redis_url, base_url, port), args=("-n", "drain@bench"), log_path=log_dir / "drain.log"
    )
    worker.env = node_env(redis_url, base_url, port)
    try:
        worker.start(wait=False)
        t0 = wait_until(lambda: ended.count, DRAIN_SKIP, timeout_s=120)
        t1 = wait_until(lambda: ended.count, DRAIN_HEAD, timeout_s=300)
        out = {"drain_jobs_s": (DRAIN_HEAD - DRAIN_SKIP) / (t1 - t0)}
        if depth >= DRAIN_LONG:
            t2 = wait_until(lambda: ended.count, DRAIN_LONG, timeout_s=600)
            out["drain_long_jobs_s"] = (DRAIN_LONG - DRAIN_SKIP) / (t2 - t0)
    finally:
        worker.stop()
        ended.close()
    return out


def one_round(depth: int, sim: Sim, log_dir: Path) -> Round:
    with RedisServer() as server:
        with Client(settings=ClientSettings(redis_url=server.url, prefix=PREFIX)) as client:
            client.submit(REQUEST)  # connections and scripts warmed up outside the timing
            client.submit_many([REQUEST] * 10)
            jobs_s, per_job = enqueue(client, depth)
        figures = {"enqueue_jobs_s": jobs_s, "bytes_per_job": per_job}
        figures |= reads(server.url, sim.base_url, log_dir, depth)
        figures |= drain(server.url, sim.base_url, log_dir, depth)
    return Round(depth, figures)


def measure(depths: list[int], rounds: int, deep_rounds: int, log_dir: Path) -> dict[int, dict[str, float]]:
    """``{depth: {figure: median over the rounds}}``; depths of 100,000 and more run ``deep_rounds`` rounds."""
    runs: dict[int, list[Round]] = {d: [] for d in depths}
    with Sim(latency_ms=0, chunk_ms=0, answer=(5, 5), per_chunk=1) as sim:
        for r in range(rounds):
            for depth in depths:
                if depth >= 100_000 and r >= deep_rounds:
                    continue
                got = one_round(depth, sim, log_dir)
                runs[depth].append(got)
                print(f"  round {r + 1} depth {depth:,}: " + ", ".join(f"{k} {v:,.1f}" for k, v in got.figures.items()))
    return {
        d: {f: statistics.median(r.figures[f] for r in rs) for f in FIGURES if f in rs[0].figures}
        for d, rs in runs.items()
    }


def baseline(result: dict[int, dict[str, float]], depths: list[int], figure: str) -> int:
    """The smallest depth with ``figure`` (the long drain needs a depth of ``DRAIN_LONG``)."""
    return next(d for d in depths if figure in result[d])


def ratio(figure: str, deep: float, base: float) -> str:
    """Largest depth over the baseline, marked when it is worse by more than 1.5x (a cost up, a rate down)."""
    x = deep / base if base else float("inf")
    worse = x > 1.5 if figure in COSTS else x < 1 / 1.5
    return f"{x:.2f}x" + (" **not flat**" if worse else "")


def section(result: dict[int, dict[str, float]], depths: list[int], rounds: int, deep_rounds: int) -> str:
    cmd = f".venv/bin/python -m bench.deep_queue --depths {','.join(map(str, depths))} --rounds {rounds}"
    cmd += f" --deep-rounds {deep_rounds}" if deep_rounds != rounds else ""
    deep = depths[-1]
    counts = ", ".join(f"{d:,}: {deep_rounds if d >= 100_000 else rounds}" for d in depths)

    def cell(figure: str, depth: int) -> str:
        value = result[depth].get(figure)
        if value is None:
            return "n/a"
        return f"{value:,.2f}" if figure.endswith("_ms") else f"{value:,.0f}"

    def last(figure: str) -> str:
        base = baseline(result, depths, figure)
        vs = "" if base == depths[0] else f" (vs {base:,})"
        return ratio(figure, result[deep][figure], result[base][figure]) + vs

    rows = [f"| {LABELS[f]} | " + " | ".join(cell(f, d) for d in depths) + f" | {last(f)} |" for f in FIGURES]
    plot = line_plot(
        "deep_queue",
        "Read latency vs jobs waiting",
        ("jobs waiting", "ms (median)"),
        {
            LABELS[f].replace("`", ""): (depths, [result[d][f] for d in depths])
            for f in ("collect_ms", "scrape_ms", "top_ms")
        },
        logx=True,
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"`{cmd}`, {time.strftime('%Y-%m-%d')}, machine as above (shared with other work: medians; rounds"
            f" per depth {counts}). Each round: a fresh private redis-server, D jobs of one small request"
            f" enqueued with `submit_many` ({CHUNK:,} per call) and nothing consuming them; then, with the D"
            f" jobs waiting, {SAMPLES} timed reads of each kind; then one node drains them. The smallest depth"
            " is the baseline; the last column is the largest depth over it (flat: no worse than 1.5x).",
            "",
            "| figure | " + " | ".join(f"{d:,} waiting" for d in depths) + f" | {deep:,} vs {depths[0]:,} |",
            "|---|" + "---|" * (len(depths) + 1),
            *rows,
            "",
            *([plot, ""] if plot else []),
            "Memory: `used_memory` growth over the enqueue divided by D (the job's record, its index entries and"
            " its broker message, all in the one Redis). Scrapes: `RedisCollector.collect()` is the node's"
            " scrape-time read (queue depth: one LLEN per priority list, whatever the depth); the HTTP GET goes"
            f" to a real node started with `-Q {IDLE_QUEUE}`, so it serves the deep queue's gauges without"
            " consuming it; the `moonq top` refresh is discovery plus a scrape of that node plus the screen's"
            f" numbers. Drain: a node with `MOONQ_CONCURRENCY={DRAIN_CONCURRENCY}` (the default, 1,000, would"
            " hold a whole 1,000-job queue in flight at once: another regime than a deep queue's) against a"
            " zero-latency simulator (5 tokens, 1 per chunk); jobs/s"
            f" from the {DRAIN_SKIP}th ended job to the {DRAIN_HEAD:,}th (the same window at every depth, ending"
            " before the smallest queue's last jobs, which end in a burst once nothing new arrives) and to"
            f" the {DRAIN_LONG:,}th where D holds that many (its ratio is against the smallest such depth),"
            " counted on the jobs' event channels: the node's rate with the rest of the D jobs waiting behind"
            " what it drains. Not measured: the rate"
            " at the tail of a 100,000-deep queue (draining 95,000 jobs at this rate takes longer than the"
            " benchmark's budget).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="1000,10000,100000", help="comma-separated, smallest first (baseline)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deep-rounds", type=int, help="rounds for depths of 100,000 and more (default: --rounds)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    depths = sorted(int(d) for d in args.depths.split(","))
    if depths[0] < DRAIN_HEAD:
        parser.error(f"depths must be at least {DRAIN_HEAD:,}")
    log_dir = Path(tempfile.mkdtemp(prefix="moonq-deep-"))
    t0 = time.monotonic()
    deep_rounds = args.rounds if args.deep_rounds is None else args.deep_rounds
    result = measure(depths, args.rounds, deep_rounds, log_dir)
    print(f"deep queue, medians (logs in {log_dir}, {time.monotonic() - t0:.0f} s):")
    for f in FIGURES:
        base = baseline(result, depths, f)
        values = ", ".join(f"{d:,}: {result[d][f]:,.2f}" for d in depths if f in result[d])
        print(f"  {f}: {values}  ({ratio(f, result[depths[-1]][f], result[base][f])})")
    if not args.no_write:
        write_section(args.out, SECTION, section(result, depths, args.rounds, deep_rounds))


if __name__ == "__main__":
    main()
