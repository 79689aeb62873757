"""Account limits as Moonshot enforces them: concurrency, RPM and TPM over a sliding minute.

Or, with ``mode="bucket"``, RPM and TPM as token buckets of size L refilled at L per minute: the
other reading of "L per minute" an upstream may have, so a client can be checked against both. A
bucket starts full and a settled request gives back what it reserved beyond its actual total.

Checked when a request arrives (after auth and validation), in the order of docs/moonshot-api.md §8:
concurrency, then RPM, then TPM. Only admitted requests count; a 429 leaves no trace.

TPM is checked against what a request *reserves* — prompt tokens + output budget x n — not what
it ends up generating (§8). While in flight a request counts its reservation; when it completes
its charge becomes its actual ``total_tokens`` (0 if it failed before generating), which frees
room for the rest of its minute.

Not thread-safe: the caller (``gate.Gate``) serialises access.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from simulator.errors import ApiError, rate_limited, tpm_limited

WINDOW_S = 60.0
QUOTA_MODES = ("window", "bucket")
# The real concurrency message always says "after 1 seconds": a slot frees as soon as any stream ends.
CONCURRENCY_RETRY_S = 1


@dataclass(frozen=True)
class Rejection:
    axis: str  # "concurrency" | "rpm" | "tpm"
    error: ApiError


class Bucket:
    """A token bucket of ``size`` refilled at ``size`` per minute, full at first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.level = float(size)
        self.at = 0.0

    def refill(self, now: float) -> float:
        self.level = min(float(self.size), self.level + (now - self.at) * self.size / WINDOW_S)
        self.at = max(self.at, now)
        return self.level

    def wait_s(self, need: float) -> float:
        """Seconds until ``need`` is in the bucket (after ``refill``)."""
        return (need - self.level) * WINDOW_S / self.size


@dataclass(eq=False)
class Slot:
    """One admitted request as the limits see it."""

    start: float
    charge: int  # reservation while in flight, then the actual total
    in_window: bool = True  # still summed into the TPM window (not evicted or reset away)
    live: bool = True  # still holds a concurrency slot
    bucket: Bucket | None = None  # bucket mode: the TPM bucket its reservation came from


class Quotas:
    def __init__(self, rpm: int | None, tpm: int | None, max_concurrency: int | None, mode: str = "window") -> None:
        if mode not in QUOTA_MODES:
            raise ValueError(f"quota mode must be one of {', '.join(QUOTA_MODES)}; got {mode!r}")
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrency = max_concurrency
        self.mode = mode
        self.in_flight = 0
        self._starts: deque[float] = deque()
        self._tokens: deque[Slot] = deque()
        self._token_sum = 0
        self._rpm_bucket = Bucket(rpm) if rpm is not None else None
        self._tpm_bucket = Bucket(tpm) if tpm is not None else None

    def check(self, now: float, reserve: int) -> Rejection | None:
        """Whether a request reserving ``reserve`` tokens may start at ``now``; nothing is recorded."""
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            limit = f"max concurrency: {self.max_concurrency}"
            return Rejection("concurrency", rate_limited(limit, CONCURRENCY_RETRY_S))
        if self.mode == "bucket":
            return self._check_buckets(now, reserve)
        self._evict(now)
        if self.rpm is not None and len(self._starts) + 1 > self.rpm:
            # The oldest start leaves the window first; that is when one more request fits.
            wait_s = max(1, math.ceil(self._starts[0] + WINDOW_S - now))
            return Rejection("rpm", rate_limited(f"max RPM: {self.rpm}", wait_s))
        if self.tpm is not None and self._token_sum + reserve > self.tpm:
            # "current" includes the new request, so it reads as over the limit, like the live text.
            return Rejection("tpm", tpm_limited(self._token_sum + reserve, self.tpm))
        return None

    def _check_buckets(self, now: float, reserve: int) -> Rejection | None:
        if self._rpm_bucket is not None and self._rpm_bucket.refill(now) < 1:
            wait_s = max(1, math.ceil(self._rpm_bucket.wait_s(1)))
            return Rejection("rpm", rate_limited(f"max RPM: {self._rpm_bucket.size}", wait_s))
        if self._tpm_bucket is not None and self._tpm_bucket.refill(now) < reserve:
            current = self._tpm_bucket.size - math.floor(self._tpm_bucket.level) + reserve
            return Rejection("tpm", tpm_limited(current, self._tpm_bucket.size))
        return None

    def admit(self, now: float, reserve: int) -> Slot:
        slot = Slot(now, reserve)
        self.in_flight += 1
        if self.mode == "bucket":
            for bucket, take in ((self._rpm_bucket, 1), (self._tpm_bucket, reserve)):
                if bucket is not None:
                    bucket.refill(now)
                    bucket.level -= take
            slot.in_window, slot.bucket = False, self._tpm_bucket
            return slot
        if self.rpm is not None:
            self._starts.append(now)
        if self.tpm is not None:
            self._tokens.append(slot)
            self._token_sum += reserve
        else:
            slot.in_window = False
        return slot

    def settle(self, slot: Slot, charge: int) -> None:
        """The request is over: frees its concurrency slot and replaces its reservation by ``charge``."""
        if slot.live:
            slot.live = False
            self.in_flight -= 1
        if slot.bucket is not None and slot.bucket is self._tpm_bucket:  # not one a reset replaced
            slot.bucket.level = min(float(slot.bucket.size), slot.bucket.level + slot.charge - charge)
        if slot.in_window:
            self._token_sum += charge - slot.charge
        slot.charge = charge

    def reset(self) -> None:
        """Empties the windows and fills the buckets; requests still in flight keep their concurrency slots."""
        for slot in self._tokens:
            slot.in_window = False
        self._starts.clear()
        self._tokens.clear()
        self._token_sum = 0
        self._rpm_bucket = Bucket(self.rpm) if self.rpm is not None else None
        self._tpm_bucket = Bucket(self.tpm) if self.tpm is not None else None

    def _evict(self, now: float) -> None:
        # The window is (now - 60 s, now]: a request exactly a minute old no longer counts.
        horizon = now - WINDOW_S
        while self._starts and self._starts[0] <= horizon:
            self._starts.popleft()
        while self._tokens and self._tokens[0].start <= horizon:
            slot = self._tokens.popleft()
            slot.in_window = False
            self._token_sum -= slot.charge
