"""The fleet limiter benchmark's tables and its section of BENCHMARKS.md (plus the shared Machine section).

BENCHMARKS.md holds a ``## Machine`` section and one ``##`` section per benchmark; ``write``
rewrites the Machine section and this benchmark's own, and keeps every other section as it is.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import celery

from bench.limiter_result import WINDOW_60_S, Result

TITLE = "# Benchmarks"
PREAMBLE = "Measured figures from the benchmarks in `bench/`. Each `##` section is written by its benchmark's own run."
MACHINE = "## Machine"
SECTION = "## Fleet rate limiter: moonq vs Celery `rate_limit`"
GOAL_QUOTA = 0.97
# The limiter's window (worker/limiter_state.py WINDOW_MS): 60 s plus 1.5 s for grant-to-arrival delay.
LIMITER_WINDOW_S = 61.5
HEADER = [
    "system",
    "limit",
    "429s",
    "max admitted in any 60 s",
    "asked in busiest 60 s (admitted + 429'd)",
    "quota used",
    "jobs ok / failed",
]


def command() -> str:
    """This run's command line, as it was typed after the interpreter."""
    return " ".join([".venv/bin/python -m bench.limiter", *sys.argv[1:]])


def machine() -> dict[str, str]:
    cpu, mem_kib = "unknown", 0
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with open("/proc/meminfo") as f:
        mem_kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), 0)
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\S+)", version)
    return {
        "CPU": cpu,
        "Cores": str(os.cpu_count()),
        "RAM": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "Redis": match.group(1) if match else version.strip(),
        "Celery": celery.__version__,
    }


def machine_line() -> str:
    """This machine in a few words, for a section's first paragraph (its CPU, cores and kernel)."""
    m = machine()
    return f"{m['CPU']}, {m['Cores']} cores, {m['OS']}"


def _amount(r: Result, value: float) -> str:
    return f"{value:,.0f}" + ("" if r.scenario.axis == "requests" else " tok")


def rows(results: Sequence[Result]) -> list[list[str]]:
    return [
        [
            r.system.label,
            f"{r.scenario.limit:,} {r.scenario.unit}",
            f"{r.n429:,}",
            f"{_amount(r, r.max_60s)} ({r.max_60s / r.scenario.limit:.1%})",
            _amount(r, r.asked_max_60s),
            f"{r.quota_used:.1%}",
            f"{r.ok:,} / {r.failed:,}" + (f" ({r.unfinished:,} still queued)" if r.unfinished else ""),
        ]
        for r in results
    ]


def markdown_table(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    return "\n".join(lines)


def cold_table(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(COLD_HEADER) + " |", "|" + "---|" * len(COLD_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in cold_rows(results)]
    return "\n".join(lines)


def text_tables(results: Sequence[Result]) -> str:
    out = []
    for key in dict.fromkeys(r.scenario.key for r in results):
        group = [r for r in results if r.scenario.key == key]
        header, body = (COLD_HEADER, cold_rows(group)) if group[0].scenario.cold_s else (HEADER, rows(group))
        table = [header, *body]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        out.append(f"Scenario {group[0].scenario.title}, window {group[0].window_s:.0f} s")
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
        out.append("")
    return "\n".join(out)


def goals(r: Result) -> str:
    misses = []
    if r.n429:
        misses.append(f"{r.n429} upstream 429{'s' if r.n429 != 1 else ''}")
    if r.max_60s > r.scenario.limit or r.asked_max_60s > r.scenario.limit:
        misses.append(f"the busiest 60 s asked for {r.asked_max_60s:,.0f} > {r.scenario.limit:,}")
    use = r.steady_use if r.scenario.cold_s else r.quota_used
    if use is None or use < GOAL_QUOTA:
        misses.append(f"quota used {use or 0:.1%} < 97%")
    if r.failed:
        misses.append(f"{r.failed} failed jobs")
    return "every goal met" if not misses else "missed: " + "; ".join(misses)


def moonq_paragraph(m: Result) -> str:
    sc = m.scenario
    what = "requests" if sc.axis == "requests" else "tokens (refunds lower a grant to what it used)"
    return (
        f"**{sc.title}, moonq.** The shared sliding window (W = {LIMITER_WINDOW_S} s) grants L {what} at once on "
        f"an idle fleet, then again as grants leave it, so no W holds more than L. This {m.window_s:.0f} s window "
        f"from a cold start holds the whole first window and the start of the next one: it admitted "
        f"{m.amount:,.0f} ({m.quota_used:.1%} of L x {m.window_s:.0f}/60; the steady share is in C). Upstream "
        f"429s: {m.n429}. Goals (0 429s, never above L in any 60 s, ≥ 97% used, 0 failed): {goals(m)}."
    )


def old_cold_finish_s(sc_limit: int, jobs: int) -> float:
    """When the bucket design the window replaced granted the last of ``jobs`` (burst L/60, refill (L - B)/62 per s)."""
    burst = max(1, sc_limit // 60)
    return (jobs - burst) / ((sc_limit - burst) / 62)


COLD_HEADER = [
    "upstream's limit",
    "runs",
    "429s (all runs)",
    "max admitted in any 60 s",
    "first L arrived within",
    "(L+1)-th arrived after the 1st",
    "last call ended",
    "ideal",
    "steady-state quota use",
    "jobs ok / failed (all runs)",
]


def cold_rows(results: Sequence[Result]) -> list[list[str]]:
    """One row per cold scenario: the median of its runs (429s and jobs summed over them)."""
    out = []
    for key in dict.fromkeys(r.scenario.key for r in results):
        runs = [r for r in results if r.scenario.key == key]
        limit = runs[0].scenario.limit

        def median(figure: Callable[[Result], float | None], runs: list[Result] = runs) -> float:
            return statistics.median(figure(r) or 0.0 for r in runs)

        unfinished = sum(r.unfinished for r in runs)
        out.append(
            [
                "token bucket of size L" if runs[0].scenario.sim.quota_mode == "bucket" else "sliding minute",
                f"{len(runs)}",
                f"{sum(r.n429 for r in runs):,}",
                f"{median(lambda r: r.max_60s):,.0f} ({median(lambda r: r.max_60s) / limit:.1%})",
                f"{median(lambda r: r.first_burst_s):.2f} s",
                f"{median(lambda r: r.next_window_s):.2f} s",
                f"{median(lambda r: r.finish_s):.1f} s",
                f"{WINDOW_60_S + median(lambda r: r.call_s):.1f} s",
                f"{median(lambda r: r.steady_use):.1%}",
                f"{sum(r.ok for r in runs):,} / {sum(r.failed for r in runs):,}"
                + (f" ({unfinished:,} unfinished)" if unfinished else ""),
            ]
        )
    return out


def cold_paragraph(results: Sequence[Result]) -> str:
    c = results[0]
    old = old_cold_finish_s(c.scenario.limit, c.jobs)
    keys = list(dict.fromkeys(r.scenario.key for r in results))
    late = ", ".join(
        f"{key} {statistics.median((r.finish_s or 0) - WINDOW_60_S - (r.call_s or 0) for r in runs):.1f} s"
        f" with {sum(r.n429 for r in runs)} 429s"
        for key in keys
        for runs in [[r for r in results if r.scenario.key == key]]
    )
    return (
        f"**C, D (cold burst), moonq.** {c.jobs:,} jobs = 1.5 x L on an idle fleet. The ideal is L at once and the "
        "rest when the first have left the upstream's minute: done 60 s plus one call after they were queued "
        f"({statistics.median(r.call_s or 0 for r in results):.2f} s median here). moonq sent L at once and the "
        f"rest as the first grants left its {LIMITER_WINDOW_S} s window: later than the ideal by (medians) {late} "
        "(a window that never holds more than L in W > 60 s also never empties a bucket of size L refilled at L "
        "per minute). A fleet with work to spare repeats its first window's arrivals every (L+1)-th - 1st "
        "seconds, so the steady-state quota use is 60 s over that period. The bucket design this replaced (burst "
        f"L/60, refill (L - B)/62 per second) would have granted the last of these jobs {old:.0f} s after they "
        "were queued (from its formula), and used 96.3% (RPM) and 96.4% (TPM) of the quota in its last run of A "
        "and B (600 RPM, 60,000 TPM, 65 s windows, 2026-11-27). Goals (0 429s, never above L, ≥ 97% steady, "
        "0 failed), over its runs: "
        + "; ".join(
            f"{key}: " + " / ".join(dict.fromkeys(goals(r) for r in results if r.scenario.key == key)) for key in keys
        )
        + "."
    )


def celery_paragraph(c: Result) -> str:
    sc = c.scenario
    what = "requests" if sc.axis == "requests" else "tokens"
    tokens = "" if sc.axis == "requests" else " It has no notion of tokens, so TPM was never considered."
    ran_out = (
        " (the jobs ran out: those not admitted in the first seconds had spent their retries before the minute"
        " rolled over)"
        if c.failed and not c.unfinished
        else ""
    )
    head = (
        f"**{sc.title}, {c.system.label}.** The rate limit is a bucket per worker: {c.nodes} workers x "
        f"{sc.rpm}/m, so the busiest 60 s asked for {c.asked_max_60s:,.0f} {what} against a limit of "
        f"{sc.limit:,}.{tokens} "
    )
    if not c.n429:
        return head + f"No 429s this time; {c.quota_used:.1%} of the quota used, {c.failed:,} jobs failed."
    return head + (
        f"The upstream turned the excess away ({c.n429:,} 429s), and that alone kept the admitted figure at the "
        f"limit; {c.failed:,} jobs failed once their 5 retries were spent, and {c.quota_used:.1%} of the quota was "
        f"used{ran_out}."
    )


def default_celery_paragraph(c: Result) -> str:
    per_worker = c.admitted / c.window_s / c.nodes if c.window_s else 0.0
    if per_worker > 0.8 * c.scenario.rpm / 60:
        return (
            f"**{c.scenario.title}, {c.system.label}.** {per_worker:.1f} tasks/s per worker, "
            f"{c.quota_used:.1%} of the quota, {c.n429:,} 429s."
        )
    return (
        f"**{c.scenario.title}, {c.system.label}.** With more than a few rate-limited messages prefetched, Celery "
        f"{celery.__version__}'s rate limit fell to ~{per_worker:.1f} task/s per worker instead of "
        f"{c.scenario.rpm / 60:g}: {c.quota_used:.1%} of the quota, {c.n429:,} 429s. Every held message arms its "
        "own timer (`Consumer._schedule_bucket_request` re-arms one each time the bucket is empty), and kombu's "
        "`Hub.fire_timers` runs at most 10 due timers per loop and then returns its 1 s default as the poll "
        "timeout, so the event loop releases about one task per second. `-c 1 --prefetch-multiplier 1` keeps the "
        "timers few, which is why the rows above use it."
    )


def miss_paragraph(results: Sequence[Result]) -> str:
    missed = [r for r in results if r.system.key == "moonq" and r.n429]
    if not missed:
        return ""
    where = "; ".join(
        f"{r.scenario.key}: {r.n429} at t = {r.first_429_s:.1f} s" for r in missed if r.first_429_s is not None
    )
    if not all(r.first_429_s is not None and 55 <= r.first_429_s <= 65 for r in missed):
        return (
            f"**moonq drew 429s ({where}).** Not at the minute boundary this run; see the raw books per run in "
            "`.bench/limiter/*/raw.json`."
        )
    return (
        f"**Why moonq still drew 429s ({where}).** The bucket bounds *grant* times in Redis; the upstream counts "
        "*arrival* times. The first burst of a run (an empty window) reaches the upstream later than requests granted "
        "a minute on (cold connections, four processes waking on two cores), so the upstream's sliding minute that "
        "begins inside that burst holds more than L: the 429s come about 60 s after the first admission. "
        f"The {LIMITER_WINDOW_S - 60:.1f} s margin of the window was not enough here. Raw books per run are in "
        "`.bench/limiter/*/raw.json`."
    )


def section(results: Sequence[Result], args: argparse.Namespace, total_s: float) -> str:
    mach = machine()
    by = {(r.scenario.key, r.system.key): r for r in results}
    a, b = by[("A", "moonq")], by[("B", "moonq")]
    charged = b.amount / b.admitted if b.admitted else 0.0
    paragraphs = [moonq_paragraph(by[(k, "moonq")]) for k in ("A", "B")]
    paragraphs += [celery_paragraph(by[(k, "celery")]) for k in ("A", "B")]
    if ("A", "celery-c16") in by:
        paragraphs.append(default_celery_paragraph(by[("A", "celery-c16")]))
    cold = [r for r in results if r.scenario.cold_s]
    paragraphs.append(cold_paragraph(cold))
    paragraphs.append(miss_paragraph(results))
    lines = [
        SECTION,
        "",
        f"`{command()}` (`make bench-limiter` runs it with the defaults), {datetime.date.today().isoformat()}; "
        "the whole run "
        f"took {total_s:.0f} s. On {mach['CPU']}, {mach['Cores']} cores, {mach['RAM']}, Python {mach['Python']}, "
        f"Redis {mach['Redis']}, Celery {mach['Celery']}.",
        "",
        f"**Setup.** Each system runs {args.nodes} worker processes on its own private redis-server against the local "
        "simulator (`simulator/`, 127.0.0.1, no added latency), which enforces the account's limits like Moonshot: "
        "a sliding minute, 429 beyond it. moonq: `celery -A worker worker` with its defaults (64 threads per node) "
        "plus `MOONQ_RPM` or `MOONQ_TPM`. Baseline: `celery -A bench.celery_baseline worker -P threads -c 1 "
        "--prefetch-multiplier 1`, one task that POSTs the body with httpx (non-streaming), "
        f'`rate_limit="{args.rpm}/m"`, and the docs\' `autoretry_for` on 429/5xx with `retry_backoff` '
        f"(1, 2, 4, 8, 16 s with full jitter, `max_retries=5`). Window {args.window:.0f} s, from the moment 1.3x "
        "the jobs the limit allows over it are queued; the runs go one after the other, each against a freshly "
        "reset simulator (D: one enforcing the same limit as a token bucket). *Max admitted in any 60 s* and "
        "*quota used* (admitted / (limit x window / 60)) come from "
        "the simulator's admitted records, so the first can never exceed the limit; *asked in busiest 60 s* adds "
        "every request the simulator refused with a 429 (TPM: at the reservation it was checked against) and is the "
        "figure that shows an overshoot.",
        "",
        f"### A - RPM: the simulator allows R = {a.scenario.limit:,} requests per minute "
        f"({a.jobs:,} jobs; moonq `MOONQ_RPM={a.scenario.limit}`)",
        "",
        markdown_table([r for r in results if r.scenario.key == "A"]),
        "",
        f"### B - TPM: the simulator allows T = {b.scenario.limit:,} tokens and R = {b.scenario.rpm:,} requests "
        f"per minute ({b.jobs:,} jobs; moonq `MOONQ_TPM={b.scenario.limit}`)",
        "",
        "Every request sets `max_completion_tokens: 256` and gets a 50-250 token answer: the simulator reserves "
        f"{b.scenario.sim_reserve} tokens while it runs and then charges its real total (~{charged:.0f} here). "
        "Charged tokens are what is counted.",
        "",
        markdown_table([r for r in results if r.scenario.key == "B"]),
        "",
        rejected_note(results),
        "",
        f"### C, D - cold burst: {cold[0].jobs:,} jobs on an idle moonq fleet, `MOONQ_RPM={cold[0].scenario.limit}`",
        "",
        "Times from the simulator's admitted records: the first L requests arrived within the first column's time, "
        "the (L+1)-th that long after the first, and the last call ended that long after the jobs were queued. "
        "Watched until every job had ended.",
        "",
        cold_table(cold),
        "",
        "### What the numbers mean",
        "",
        "\n\n".join(p for p in paragraphs if p),
        "",
    ]
    return "\n".join(lines)


def rejected_note(results: Sequence[Result]) -> str:
    bits = []
    for r in results:
        if r.scenario.cold_s:  # their 429s are in their own table
            continue
        axes = ", ".join(f"{k} {v:,}" for k, v in sorted(r.rejected_by_axis.items())) or "none"
        extra = f"; Celery retries {r.retried:,}" if r.retried is not None else ""
        errors = f"; other upstream errors {r.other_errors}" if r.other_errors else ""
        bits.append(f"{r.scenario.key} {r.system.label}: {axes}{extra}{errors}")
    return "429s by the limit that refused them, per the simulator: " + " · ".join(bits) + "."


# Machines differ between runs (the same kind of machine, not the same CPU): the table is the latest
# run's, and each section a run writes names its own CPU where its text said "Machine as above".
MACHINE_NOTE = (
    "The machine of the latest benchmark run. A section names the CPU it was measured on; one that says"
    " only *Machine as above* was written before sections named theirs, on the machine this table named"
    " at the time (at the last such run, 2026-12-01: an AMD EPYC of 2 cores, Linux 6.18.44-fc-v669)."
    " Ratios within a section come from one run on one machine; figures from different sections may not."
)


def machine_section() -> str:
    table = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in machine().items())]
    return "\n".join([MACHINE, "", MACHINE_NOTE, "", *table]) + "\n"


def stamped(text: str) -> str:
    """``text`` with "Machine as above" (or "machine as above") naming this machine's CPU and cores."""
    m = machine()
    named = f"{m['CPU']}, {m['Cores']} cores, {m['OS']}"
    return text.replace("Machine as above", f"Machine: {named}").replace("machine as above", f"machine: {named}")


PLOTS = Path(__file__).resolve().parent / "plots"


def line_plot(
    name: str,
    title: str,
    axes: tuple[str, str],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    logx: bool = False,
    goal: tuple[float, str] | None = None,
    save: bool = True,
) -> str:
    """Draws ``series`` (label -> (xs, ys)) with markers to ``bench/plots/<name>.png``, ``axes`` naming x and
    y, and ``goal`` (y, label) as a dashed line; the Markdown line that shows it in a section, or "" when
    matplotlib (the ``bench`` extra) is not installed or ``save`` is false (a ``--no-write`` run leaves the
    committed plots as they are)."""
    if not save:
        return ""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        return ""
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if goal is not None:
        ax.axhline(goal[0], linestyle="--", color="grey", label=goal[1])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(PLOTS / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"![{title}](bench/plots/{name}.png)"


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, [(heading line, whole section text)]) split at ``## `` headings."""
    chunks = re.split(r"(?m)^(?=## )", text)
    return chunks[0], [(s.splitlines()[0].strip(), s) for s in chunks[1:]]


def write_section(path: Path, heading: str, text: str) -> None:
    """Rewrites the Machine section and the section under ``heading``; every other section stays."""
    old = path.read_text() if path.exists() else f"{TITLE}\n\n{PREAMBLE}\n\n"
    preamble, sections = split_sections(old)
    fresh = {MACHINE: machine_section(), heading: stamped(text)}
    out = [(h, fresh.pop(h) if h in fresh else s) for h, s in sections]
    if MACHINE in fresh:
        out.insert(0, (MACHINE, fresh.pop(MACHINE)))
    out += list(fresh.items())
    path.write_text(preamble.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for _, s in out))


def write(path: Path, results: Sequence[Result], args: argparse.Namespace, total_s: float) -> None:
    write_section(path, SECTION, section(results, args, total_s))
