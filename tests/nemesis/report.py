"""What a seed's run amounts to: outcomes, faults, invariants held or broken, recovery times; and the
"Chaos" section of BENCHMARKS.md (written through ``bench.report.write_section``, like every benchmark).

Recovery time of a fault: from its injection until every job it affected made progress again (its
next event reached a follower). Affected: jobs in flight at injection (a follower had an event of
theirs and not the last) that the faulted node had received, or every job in flight for a fault of
Redis or the broker. A fault that affected no job has no recovery time; one whose jobs never moved
again counts as unrecovered (and those jobs show up as ``job_ends`` violations).
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nemesis.checker import INVARIANTS, Violation
from tests.nemesis.cluster import RECEIVED
from tests.nemesis.history import Fault, History

SECTION = "## Chaos: the nemesis (seeded faults, whole-history checker)"


@dataclass
class Recovery:
    fault: Fault
    affected: int
    seconds: float | None  # None: some affected job never made progress again


def _affected(history: History, fault: Fault) -> list[str]:
    with history.lock:
        followed = {j: list(seen) for j, seen in history.followed.items()}
    in_flight = []
    for job_id, seen in followed.items():
        before = [r for r in seen if r.t <= fault.t_inject]
        if before and not before[-1].event.terminal:
            in_flight.append(job_id)
    if fault.target.startswith("node"):
        received: set[str] = set()
        nodes = tuple(f"{name}-" for name in fault.target.split("+"))
        for path, size in fault.log_marks.items():
            if Path(path).name.startswith(nodes):
                received |= {m.decode() for m in RECEIVED.findall(Path(path).read_bytes()[:size])}
        in_flight = [j for j in in_flight if j in received]
    return in_flight


def recoveries(history: History) -> list[Recovery]:
    out = []
    with history.lock:
        faults = list(history.faults)
        followed = {j: list(seen) for j, seen in history.followed.items()}
    for fault in faults:
        affected = _affected(history, fault)
        if not affected:
            continue
        waits: list[float] = []
        for job_id in affected:
            after = next((r.t for r in followed[job_id] if r.t > fault.t_inject), None)
            if after is None:
                waits = []
                break
            waits.append(after - fault.t_inject)
        out.append(Recovery(fault, len(affected), max(waits) if waits else None))
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass
class SeedReport:
    seed: int
    broker: str
    nodes: int
    jobs: int  # distinct jobs submitted (ids returned)
    submits: int  # submit calls, retries and duplicates included
    outcomes: Counter[str]
    faults: Counter[str]
    violations: list[Violation]
    recoveries: list[Recovery]
    duration_s: float
    upstream_calls: int
    sim_faults: dict[str, int] = field(default_factory=dict)
    cancels: int = 0
    workdir: str = ""

    def broken(self) -> Counter[str]:
        return Counter(v.invariant for v in self.violations)

    def recovery_s(self) -> list[float]:
        return [r.seconds for r in self.recoveries if r.seconds is not None]

    def unrecovered(self) -> int:
        return sum(1 for r in self.recoveries if r.seconds is None)

    def summary(self) -> str:
        """Several lines for a terminal: the figures, then each invariant held or how often it broke."""
        waits = self.recovery_s()
        p50, p99 = percentile(waits, 0.5), percentile(waits, 0.99)
        lines = [
            f"seed {self.seed} ({self.broker}, {self.nodes} nodes): {self.jobs} jobs in {self.duration_s:.0f} s, "
            f"outcomes {_counts(self.outcomes)}; {self.upstream_calls} upstream calls, "
            f"simulator faults {_counts(Counter(self.sim_faults))}; {self.cancels} cancels",
            f"  faults injected: {_counts(self.faults)} ({sum(self.faults.values())} in all)",
            f"  recovery: p50 {_s(p50)}, p99 {_s(p99)} over {len(waits)} faults with affected jobs"
            + (f"; {self.unrecovered()} never recovered" if self.unrecovered() else ""),
        ]
        broken = self.broken()
        for name in INVARIANTS:
            lines.append(
                f"  {'VIOLATED' if broken[name] else 'held    '} {name}" + (f" x{broken[name]}" if broken[name] else "")
            )
        if self.workdir:
            lines.append(f"  logs and history: {self.workdir}")
        return "\n".join(lines)

    def failure_message(self, limit: int = 40) -> str:
        shown = "\n".join(v.line() for v in self.violations[:limit])
        more = f"\n... and {len(self.violations) - limit} more" if len(self.violations) > limit else ""
        return f"{len(self.violations)} invariant violations (seed {self.seed}):\n{shown}{more}\n\n{self.summary()}"

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "broker": self.broker,
            "jobs": self.jobs,
            "outcomes": dict(self.outcomes),
            "faults": dict(self.faults),
            "violations": [
                {"invariant": v.invariant, "job_id": v.job_id, "evidence": v.evidence} for v in self.violations
            ],
            "recoveries": [
                {
                    "kind": r.fault.kind,
                    "target": r.fault.target,
                    "detail": r.fault.detail,
                    "affected": r.affected,
                    "s": r.seconds,
                }
                for r in self.recoveries
            ],
            "duration_s": self.duration_s,
        }


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items())) or "none"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def write_json(report: SeedReport, path: Path) -> None:
    path.write_text(json.dumps(report.as_json(), indent=1, default=str))


def section(reports: list[SeedReport], command: str, total_s: float) -> str:
    """The BENCHMARKS.md section: one row per seed, then every violated invariant with an example."""
    header = ["seed", "broker", "jobs", "outcomes", "faults injected", "recovery p50 / p99", "invariants violated"]
    rows = []
    for r in reports:
        waits = r.recovery_s()
        recovered = f"{_s(percentile(waits, 0.5))} / {_s(percentile(waits, 0.99))}"
        if r.unrecovered():
            recovered += f" ({r.unrecovered()} unrecovered)"
        broken = ", ".join(f"{k} x{n}" for k, n in sorted(r.broken().items())) or "none"
        rows.append([str(r.seed), r.broker, str(r.jobs), _counts(r.outcomes), _counts(r.faults), recovered, broken])
    all_waits = [w for r in reports for w in r.recovery_s()]
    lines = [
        SECTION,
        "",
        f"`{command}` (`make chaos` runs 10 seeds x 500 jobs), {datetime.date.today().isoformat()}; "
        f"{len(reports)} seed{'s' if len(reports) != 1 else ''} in {total_s:.0f} s; the rows are this run's seeds "
        "only. "
        "Each seed: a private Redis (AOF) or RabbitMQ, real `celery -A worker worker` nodes each behind its own TCP "
        "proxy, the simulator with 8% random upstream faults, and a nemesis mixing SIGKILL, SIGTERM, SIGSTOP past "
        "the visibility timeout, ±15 s clock skew (libfaketime), Redis restarts and pauses, cut, black-holed and "
        "refused links, and (RabbitMQ) broker restarts and cut AMQP connections; producers cancel and resubmit with "
        "idempotency keys meanwhile. Liveness settings are the tests' fast ones (3 s visibility timeout). The "
        "checker (`tests/nemesis/checker.py`) reads the whole history: replay logs, followers, the producers' log, "
        "every upstream call tied to its job.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Recovery over all seeds (injection until every affected job made progress again): p50 "
        f"{_s(percentile(all_waits, 0.5))}, p99 {_s(percentile(all_waits, 0.99))}, {len(all_waits)} faults.",
        "",
    ]
    examples = _examples(reports)
    if examples:
        lines += ["**Violations found** (one example each; the whole list is in each seed's `report.json`):", ""]
        lines += [f"- `{name}` ({INVARIANTS[name]}): seed {seed}, {line}" for name, (seed, line) in examples.items()]
    else:
        lines.append("Every invariant held on every seed.")
    return "\n".join(lines) + "\n"


def _examples(reports: list[SeedReport]) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for r in reports:
        for v in r.violations:
            if v.invariant not in out:
                out[v.invariant] = (r.seed, f"job `{v.job_id}`: `{json.dumps(v.evidence, default=str)[:300]}`")
    return out
