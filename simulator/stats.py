"""What the simulator saw, for tests and benchmarks: counters and one record per admitted request.

Times are seconds since the server started. A request's token *charge* is its actual
``total_tokens`` once it has finished (0 if it failed before generating), else its reservation —
the same numbers the TPM limit sees, so ``max_tokens_in_any_60s <= tpm`` holds for any run with
the quotas in window mode (buckets allow up to twice that).

Not thread-safe: the caller (``gate.Gate``) serialises access.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from simulator.quota import WINDOW_S


def max_in_window(events: Iterable[tuple[float, float]], window_s: float) -> float:
    """The largest total weight of events that fit in any window of ``window_s`` seconds.

    Windows are half-open like the limits' own (an event exactly ``window_s`` older than another
    is not in its window), so a limit of L per window holds iff this returns <= L.

    Args:
        events: (time, weight) pairs in any order; weights >= 0.
        window_s: the window length.

    Returns:
        The maximum sum of weights over events whose times span less than ``window_s``; 0 for none.
    """
    ordered = sorted(events)
    best = total = 0.0
    left = 0
    for time_s, weight in ordered:
        total += weight
        while ordered[left][0] <= time_s - window_s:
            total -= ordered[left][1]
            left += 1
        best = max(best, total)
    return best


@dataclass(eq=False)
class Admitted:
    """One admitted request; ``end`` stays None while it is in flight."""

    start: float
    prompt_tokens: int
    reserved_tokens: int
    fault: str | None
    status: int = 200
    end: float | None = None
    completion_tokens: int = 0
    charged_tokens: int | None = None

    @property
    def charge(self) -> int:
        return self.reserved_tokens if self.charged_tokens is None else self.charged_tokens

    def as_json(self) -> dict[str, Any]:
        return {
            "start": round(self.start, 6),
            "end": None if self.end is None else round(self.end, 6),
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reserved_tokens": self.reserved_tokens,
            "charged_tokens": self.charge,
            "fault": self.fault,
        }


class Stats:
    def __init__(self) -> None:
        self.by_status: Counter[int] = Counter()
        self.by_fault: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.admitted: list[Admitted] = []

    def snapshot(self, now: float, in_flight: int) -> dict[str, Any]:
        return {
            "uptime_s": round(now, 6),
            "requests": sum(self.by_status.values()),
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "by_fault": dict(sorted(self.by_fault.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "in_flight": in_flight,
            "admitted": [record.as_json() for record in self.admitted],
            "max_requests_in_any_60s": int(max_in_window(((r.start, 1) for r in self.admitted), WINDOW_S)),
            "max_tokens_in_any_60s": int(max_in_window(((r.start, r.charge) for r in self.admitted), WINDOW_S)),
        }
