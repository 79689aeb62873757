"""Admission of chat requests: quotas, then the fault pick, then the books.

The order per request, all under one lock so it is atomic:

1. quota check (concurrency, RPM, TPM) — a 429 here is not admitted;
2. fault pick (``sim`` script or random draw) — a 429 fault is not admitted either, while a
   500/503 fault is: the request reached the service and failed, so it counts towards RPM and
   is charged 0 tokens;
3. admission: a ``Slot`` in the quota windows and an ``Admitted`` record in the stats.

The lock is a ``threading.Lock`` because ``SimServer.stats()``/``reset()`` read from the caller's
thread while the event loop thread serves; nothing awaits while holding it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulator.config import SimConfig
from simulator.faults import Fault
from simulator.quota import Quotas, Slot
from simulator.scripts import Directive, FaultPicker
from simulator.stats import Admitted, Stats
from simulator.validate import ChatRequest


@dataclass(frozen=True, eq=False)
class Ticket:
    """An admitted request: its fault (None for a normal answer) and its bookkeeping."""

    fault: Fault | None
    record: Admitted
    slot: Slot


class Gate:
    def __init__(self, cfg: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self._quotas = Quotas(cfg.rpm, cfg.tpm, cfg.max_concurrency, cfg.quota_mode)
        self._picker = FaultPicker(cfg.seed, cfg.fault_rate, cfg.fault_kinds)
        self._stats = Stats()

    def admit(self, req: ChatRequest, directive: Directive | None) -> Ticket:
        """Admits a validated request, or raises the error that answers it.

        Raises:
            ApiError: a quota 429, or the error of an HTTP-level fault.
        """
        # Moonshot reserves the whole output budget of every choice (docs/moonshot-api.md §8).
        reserve = req.prompt_tokens + req.max_completion_tokens * req.n
        with self._lock:
            now = self._now()
            rejection = self._quotas.check(now, reserve)
            if rejection is not None:
                self._stats.rejected[rejection.axis] += 1
                raise rejection.error
            fault = self._picker.pick(directive, req.stream)
            if fault is not None:
                self._stats.by_fault[fault.name] += 1
            error = fault.error() if fault is not None else None
            if error is not None and error.status == 429:
                raise error
            record = Admitted(now, req.prompt_tokens, reserve, fault.name if fault is not None else None)
            ticket = Ticket(fault, record, self._quotas.admit(now, reserve))
            self._stats.admitted.append(record)
            if error is not None:
                self._settle(ticket, error.status, completion_tokens=0, total_tokens=0)
                raise error
            return ticket

    def settle(self, ticket: Ticket, status: int, completion_tokens: int, total_tokens: int) -> None:
        """The response is over (sent, cut or abandoned); idempotent."""
        with self._lock:
            self._settle(ticket, status, completion_tokens, total_tokens)

    def _settle(self, ticket: Ticket, status: int, completion_tokens: int, total_tokens: int) -> None:
        record = ticket.record
        if record.end is not None:
            return
        record.end = self._now()
        record.status = status
        record.completion_tokens = completion_tokens
        record.charged_tokens = total_tokens
        self._quotas.settle(ticket.slot, total_tokens)

    def count(self, status: int) -> None:
        """Counts one chat response by status, whatever answered it (auth, validation, quota, fault)."""
        with self._lock:
            self._stats.by_status[status] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.snapshot(self._now(), self._quotas.in_flight)

    def reset(self) -> None:
        """Clears stats, quota windows and script counters, and re-seeds the random faults."""
        with self._lock:
            self._stats = Stats()
            self._quotas.reset()
            self._picker.reset()

    def _now(self) -> float:
        return self._clock() - self._t0
