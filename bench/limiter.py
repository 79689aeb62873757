"""Fleet rate limits: moonq's shared limiter vs plain Celery's per-worker ``rate_limit``, in one run.

    python -m bench.limiter [--quick] [--rpm R] [--tpm T] [--window S] [--nodes N] [--no-write]

Four scenarios against the local simulator, which enforces the account's limits like Moonshot
(a sliding minute, 429 beyond it) or, in D, as token buckets:

* A (RPM): the simulator allows R requests per minute; each system runs N worker nodes limited
  to R (moonq: ``MOONQ_RPM=R`` shared in Redis; Celery: ``rate_limit=f"{R}/m"`` on the task).
* B (TPM): the simulator allows T tokens per minute (prompt + ``max_completion_tokens`` reserved
  while a request runs, the real total after) and still R requests; moonq gets ``MOONQ_TPM=T``,
  Celery the same ``rate_limit=f"{R}/m"`` (it has nothing for tokens).
* C (cold burst): 1.5 x R jobs on an idle moonq fleet with ``MOONQ_RPM=R``, against the sliding
  minute; the ideal is R at once and the rest one minute later. Watched until every job has ended:
  when the R-th and the (R+1)-th request arrived, when the last call ended, 429s.
* D: C against an upstream whose R per minute is a token bucket of size R (``quota_mode="bucket"``).
  C and D run ``--cold-runs`` times each; the report gives the medians.

Celery runs as ``-P threads -c 1 --prefetch-multiplier 1``, where its rate limit delivers what
it promises per worker; scenario A also runs it as ``-c 16`` with the default prefetch, where
it does not (see BENCHMARKS.md).

Each (scenario, system) runs alone on a fresh redis-server against a freshly reset simulator,
with 1.3x the jobs the limit allows over the measurement window queued at its start, so the
limit and not the supply is the bottleneck. From the simulator's own books over the window:
429s, the most admitted in any 60 s (requests or charged tokens) vs the limit, and quota used =
admitted / (limit x window / 60). Writes its section of BENCHMARKS.md (unless ``--quick`` or
``--no-write``); worker logs go to ``.bench/limiter/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.fleets import REPO, CeleryFleet, Fleet, MoonqFleet
from bench.limiter_result import WINDOW_60_S, Result, Scenario, System
from bench.sim import RecordingSim
from harness import RedisServer
from simulator import SimConfig, max_in_window
from simulator.validate import parse_chat_request

MODEL = "moonshot-v1-8k"
SUPPLY = 1.3  # jobs queued = this x what the limit allows over the window
COLD_SUPPLY = 1.5  # C, D: jobs queued = this x R
COLD_MAX_S = 150.0  # C, D: ideally done in about 61 s; give up watching after this
LOG_DIR = REPO / ".bench" / "limiter"
PROGRESS_EVERY_S = 20.0

MOONQ = System("moonq", "moonq")
CELERY = System("celery", "Celery rate_limit, -c 1, prefetch x1", concurrency=1, prefetch=1)
CELERY_C16 = System("celery-c16", "Celery rate_limit, -c 16, default prefetch x4", concurrency=16, prefetch=4)


def prompt(i: int) -> list[dict[str, str]]:
    # Numbered, so every job gets its own answer (the simulator's answers are seeded by the request).
    return [{"role": "user", "content": f"Request {i}: a few sentences on why queues smooth bursty traffic."}]


def reservation(request: dict[str, Any]) -> int:
    """The tokens the simulator (like Moonshot) reserves for ``request``: prompt + output budget x n."""
    req = parse_chat_request(request)
    return req.prompt_tokens + req.max_completion_tokens * req.n


def scenarios(rpm: int, tpm: int, window_s: float) -> list[Scenario]:
    rpm_requests = [{"model": MODEL, "messages": prompt(i)} for i in range(math.ceil(SUPPLY * rpm * window_s / 60))]
    a = Scenario(
        key="A",
        axis="requests",
        limit=rpm,
        rpm=rpm,
        sim=SimConfig(seed=7, rpm=rpm, tokens_per_chunk=8),
        moonq_env={"MOONQ_RPM": str(rpm)},
        requests=rpm_requests,
        sim_reserve=reservation(rpm_requests[0]),
        systems=(MOONQ, CELERY, CELERY_C16),
    )
    # B: answers of 50-250 tokens under a 256-token budget, so a request reserves ~280 tokens while
    # it runs and is charged ~170 after: refunding the unused budget is part of what is measured.
    answer_tokens, budget = (50, 250), 256
    expected_charge = parse_chat_request({"model": MODEL, "messages": prompt(0)}).prompt_tokens + sum(answer_tokens) / 2
    if tpm / expected_charge >= rpm:
        raise SystemExit(f"--tpm {tpm} would not bind before --rpm {rpm} (~{expected_charge:.0f} tokens per request)")
    tpm_jobs = math.ceil(SUPPLY * tpm * window_s / 60 / expected_charge)
    b = Scenario(
        key="B",
        axis="tokens",
        limit=tpm,
        rpm=rpm,
        sim=SimConfig(seed=7, rpm=rpm, tpm=tpm, answer_tokens=answer_tokens, tokens_per_chunk=16),
        moonq_env={"MOONQ_TPM": str(tpm)},
        requests=[{"model": MODEL, "messages": prompt(i), "max_completion_tokens": budget} for i in range(tpm_jobs)],
        sim_reserve=reservation({"model": MODEL, "messages": prompt(0), "max_completion_tokens": budget}),
        systems=(MOONQ, CELERY),
    )
    cold = [{"model": MODEL, "messages": prompt(i)} for i in range(math.ceil(COLD_SUPPLY * rpm))]
    c, d = (
        Scenario(
            key=key,
            axis="requests",
            limit=rpm,
            rpm=rpm,
            sim=SimConfig(seed=7, rpm=rpm, tokens_per_chunk=8, quota_mode=mode),
            moonq_env={"MOONQ_RPM": str(rpm)},
            requests=cold,
            sim_reserve=reservation(cold[0]),
            systems=(MOONQ,),
            cold_s=COLD_MAX_S,
        )
        for key, mode in (("C", "window"), ("D", "bucket"))
    )
    return [a, b, c, d]


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", flush=True)


def make_fleet(system: System, sc: Scenario, redis_url: str, base_url: str, nodes: int, log_dir: Path) -> Fleet:
    if system is MOONQ:
        return MoonqFleet(redis_url, base_url, sc.moonq_env, nodes, log_dir)
    return CeleryFleet(redis_url, base_url, f"{sc.rpm}/m", nodes, log_dir, system.concurrency, system.prefetch)


def phase_dir(sc: Scenario, system: System, run: int) -> Path:
    """Where a phase's worker logs and raw books go: one directory per run of a repeated cold burst."""
    return LOG_DIR / (f"{sc.key}-{system.key}" + (f"-{run + 1}" if sc.cold_s else ""))


def run_phase(
    sc: Scenario, system: System, sim: RecordingSim, args: argparse.Namespace, say: Progress, run: int = 0
) -> Result:
    log_dir = phase_dir(sc, system, run)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    started = time.monotonic()
    name = f"{sc.title} {system.label}"
    with RedisServer() as server:
        fleet = make_fleet(system, sc, server.url, sim.base_url, args.nodes, log_dir)
        try:
            say(f"{name}: starting {args.nodes} worker processes")
            fleet.start()
            result = measure(sc, system, fleet, args, sim, say, log_dir)
            if isinstance(fleet, CeleryFleet):
                result.retried = fleet.retried()
        finally:
            fleet.stop()
    result.phase_s = time.monotonic() - started
    say(f"{name}: done in {result.phase_s:.0f} s; {summary(result)}")
    return result


def measure(
    sc: Scenario,
    system: System,
    fleet: Fleet,
    args: argparse.Namespace,
    sim: RecordingSim,
    say: Progress,
    log_dir: Path,
) -> Result:
    """Queue the jobs, then watch for ``args.window`` s (less if every job has ended: nothing more is sent)."""
    window_s = sc.cold_s or args.window
    sim.reset()
    t0 = time.monotonic()
    fleet.enqueue(sc.requests)
    say(f"{sc.title} {system.label}: {len(sc.requests)} jobs queued; measuring {window_s:.0f} s")
    next_line = t0 + PROGRESS_EVERY_S
    while (now := time.monotonic()) < t0 + window_s:
        ok, failed = fleet.counts()
        if ok + failed >= len(sc.requests):
            say(f"  t={now - t0:3.0f}s every job has ended ({ok} ok, {failed} failed); nothing more will be sent")
            break
        if now >= next_line:
            seen = [s for _, s in list(sim.arrivals)]
            upstream = f"upstream 200={seen.count(200)} 429={seen.count(429)}"
            say(f"  t={now - t0:3.0f}s jobs ok={ok} failed={failed}, {upstream}")
            next_line += PROGRESS_EVERY_S
        time.sleep(max(0.0, min(1.0, t0 + window_s - now)))
    ok, failed = fleet.counts()
    result = Result(scenario=sc, system=system, window_s=window_s, jobs=len(sc.requests), nodes=args.nodes)
    result.ok, result.failed = ok, failed
    stats, arrivals = sim.stats(), list(sim.arrivals)
    tally(result, sim, stats, arrivals, t0)
    dump(log_dir / "raw.json", sim, stats, arrivals, t0)
    return result


def dump(path: Path, sim: RecordingSim, stats: dict[str, Any], arrivals: list[tuple[float, int]], t0: float) -> None:
    """The raw books, times in seconds from the window's start, for a closer look after the run."""

    def rel(t: float | None) -> float | None:
        return None if t is None else round(sim.to_monotonic(t) - t0, 6)

    admitted = [{**a, "start": rel(a["start"]), "end": rel(a["end"])} for a in stats["admitted"]]
    raw = {
        "admitted": admitted,
        "arrivals": [[round(t - t0, 6), s] for t, s in arrivals],
        "by_status": stats["by_status"],
        "rejected": stats["rejected"],
    }
    path.write_text(json.dumps(raw))


def tally(r: Result, sim: RecordingSim, stats: dict[str, Any], arrivals: list[tuple[float, int]], t0: float) -> None:
    """The figures over [t0, t0 + window), from the simulator's admitted records and the arrival log."""
    sc = r.scenario

    def inside(t: float) -> bool:
        return t0 <= t < t0 + r.window_s

    admitted = [a for a in stats["admitted"] if inside(sim.to_monotonic(a["start"]))]
    events = [
        (sim.to_monotonic(a["start"]), float(1 if sc.axis == "requests" else a["charged_tokens"])) for a in admitted
    ]
    sent = [(t, s) for t, s in arrivals if inside(t)]
    refused = [(t, float(1 if sc.axis == "requests" else sc.sim_reserve)) for t, s in sent if s == 429]
    r.admitted = len(admitted)
    r.amount = sum(w for _, w in events)
    r.max_60s = max_in_window(events, WINDOW_60_S)
    r.asked_max_60s = max_in_window(events + refused, WINDOW_60_S)
    r.n429 = sum(1 for _, s in sent if s == 429)
    r.first_429_s = min((t - t0 for t, s in sent if s == 429), default=None)
    r.other_errors = sum(1 for _, s in sent if s not in (200, 429))
    r.rejected_by_axis = dict(stats.get("rejected") or {})
    if sc.cold_s:
        cold_figures(r, sim, admitted, t0)


def cold_figures(r: Result, sim: RecordingSim, admitted: list[dict[str, Any]], t0: float) -> None:
    """When the L-th and (L+1)-th request arrived after the first, the last call's end, the median call."""
    limit = r.scenario.limit
    starts = sorted(sim.to_monotonic(a["start"]) for a in admitted)
    ended = [a for a in admitted if a["end"] is not None]
    if len(starts) > limit:
        r.first_burst_s = starts[limit - 1] - starts[0]
        r.next_window_s = starts[limit] - starts[0]
    if ended:
        r.finish_s = max(sim.to_monotonic(a["end"]) for a in ended) - t0
        r.call_s = statistics.median(a["end"] - a["start"] for a in ended)


def summary(r: Result) -> str:
    cold = (
        f" first L within {r.first_burst_s or 0:.2f}s, L+1-th at {r.next_window_s or 0:.2f}s, done at"
        f" {r.finish_s or 0:.1f}s, steady {r.steady_use or 0:.1%}"
        if r.scenario.cold_s
        else f" quota={r.quota_used:.1%}"
    )
    return f"429s={r.n429} max60s={r.max_60s:,.0f}/{r.scenario.limit:,}{cold} ok={r.ok} failed={r.failed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=600, help="R: the account's requests per minute (default 600)")
    parser.add_argument("--tpm", type=int, default=60_000, help="T: the account's tokens per minute (default 60000)")
    parser.add_argument("--window", type=float, default=None, help="measurement window per run, s (default 65)")
    parser.add_argument("--nodes", type=int, default=4, help="worker processes per system (default 4)")
    parser.add_argument("--cold-runs", type=int, default=3, help="runs of each cold burst, C and D (default 3)")
    parser.add_argument("--quick", action="store_true", help="20 s windows, a smoke run; BENCHMARKS.md untouched")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these, e.g. A-moonq B-celery (implies --no-write)"
    )
    args = parser.parse_args()
    args.window = args.window or (20.0 if args.quick else 65.0)
    say = Progress()
    results: list[Result] = []
    plan = scenarios(args.rpm, args.tpm, args.window)
    say(f"fleet limiter benchmark: {args.nodes} nodes per system, {args.window:.0f} s windows, logs in {LOG_DIR}")
    for sc in plan:
        with RecordingSim(sc.sim) as sim:
            say(f"{sc.title}: simulator on {sim.base_url} (rpm={sc.sim.rpm}, tpm={sc.sim.tpm})")
            for system in sc.systems:
                if args.only is None or f"{sc.key}-{system.key}" in args.only:
                    runs = args.cold_runs if sc.cold_s else 1
                    results += [run_phase(sc, system, sim, args, say, run) for run in range(runs)]
    total_s = time.monotonic() - say.t0
    print()
    print(report.text_tables(results))
    print(f"total run time {total_s:.0f} s")
    if not (args.quick or args.no_write or args.only is not None):
        report.write(args.output, results, args, total_s)
        say(f"wrote {args.output}")


if __name__ == "__main__":
    main()
