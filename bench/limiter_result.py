"""One fleet-limiter run's setup and figures: the types bench/limiter.py measures and bench/report.py prints.

Their own module so the two import it and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simulator import SimConfig

WINDOW_60_S = 60.0


@dataclass(frozen=True)
class System:
    """A system under test: moonq, or Celery run with this concurrency and prefetch."""

    key: str
    label: str
    concurrency: int = 0  # Celery only
    prefetch: int = 0


@dataclass(frozen=True)
class Scenario:
    """One limit the simulator enforces (RPM or TPM), the jobs queued against it and the systems run."""

    key: str  # "A" | "B"
    axis: str  # "requests" | "tokens"
    limit: int  # R or T: what the simulator enforces on this axis
    rpm: int  # the simulator's RPM (both scenarios) and Celery's rate_limit per worker
    sim: SimConfig
    moonq_env: dict[str, str]
    requests: list[dict[str, Any]]
    sim_reserve: int  # what the simulator reserves per request: prompt + output budget
    systems: tuple[System, ...]
    # A cold burst (C, D): watched until every job has ended, at most this long, instead of the run's window.
    cold_s: float | None = None

    @property
    def unit(self) -> str:
        return "RPM" if self.axis == "requests" else "TPM"

    @property
    def title(self) -> str:
        return f"{self.key} ({self.unit})"


@dataclass
class Result:
    """One (scenario, system) run: its figures over the measurement window, from the simulator's books."""

    scenario: Scenario
    system: System
    window_s: float
    jobs: int
    nodes: int
    admitted: int = 0  # requests admitted in the window
    amount: float = 0.0  # admitted on the scenario's axis (requests or charged tokens)
    max_60s: float = 0.0
    # What was asked of the limit in the busiest 60 s: admitted requests as counted above, plus every
    # request refused with a 429 (TPM: at the reservation the upstream checked it against).
    asked_max_60s: float = 0.0
    n429: int = 0
    first_429_s: float | None = None  # from the window's start
    other_errors: int = 0
    ok: int = 0
    failed: int = 0
    rejected_by_axis: dict[str, int] = field(default_factory=dict)
    retried: int | None = None
    phase_s: float = 0.0
    # Cold bursts only, from the simulator's admitted records (seconds): when the L-th and the
    # (L+1)-th request arrived after the first, when the last job's call ended after the jobs were
    # queued, and the median call.
    first_burst_s: float | None = None
    next_window_s: float | None = None
    finish_s: float | None = None
    call_s: float | None = None

    @property
    def quota_used(self) -> float:
        return self.amount / (self.scenario.limit * self.window_s / WINDOW_60_S)

    @property
    def steady_use(self) -> float | None:
        """A saturated limiter's share of the limit: L arrivals per (L+1-th arrival - 1st), per minute.

        The window grants again what leaves it, so a fleet with work to spare repeats its first
        window's arrivals with this period.
        """
        return WINDOW_60_S / self.next_window_s if self.next_window_s else None

    @property
    def unfinished(self) -> int:
        return self.jobs - self.ok - self.failed
