"""Simulator configuration: one frozen object built at the entry point and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from simulator.faults import DEFAULT_RANDOM_KINDS, parse_fault
from simulator.quota import QUOTA_MODES


@dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulator instance.

    Attributes:
        seed: mixed into every generated answer; two servers with the same seed answer alike.
            Also seeds the random fault draw.
        first_token_latency_s: pause before the first stream chunk (and before a non-stream body).
        chunk_interval_s: pause between stream chunks.
        tokens_per_chunk: tokens per content fragment; ``None`` varies it between 1 and 3 like the real API.
        answer_tokens: (min, max) length of a plain text answer, in tokens.
        reasoning_tokens: (min, max) length of the reasoning of thinking models, in tokens.
        cache_entries: how many message-prefix hashes the context cache remembers (LRU).
        fault_rate: probability in [0, 1] that a request without a ``sim`` field gets a random fault.
        fault_kinds: fault specs (``"overload"``, ``"stall:2"``, ...) the random draw picks from.
        rpm: requests per sliding minute the account may start; None for no limit.
        tpm: tokens (prompt + output budget) per sliding minute; None for no limit.
        max_concurrency: requests the account may have in flight; None for no limit.
        quota_mode: how ``rpm`` and ``tpm`` are enforced: ``"window"``, a sliding minute like
            Moonshot's, or ``"bucket"``, token buckets of that size refilled at that rate per minute.
    """

    seed: int = 0
    first_token_latency_s: float = 0.0
    chunk_interval_s: float = 0.0
    tokens_per_chunk: int | None = None
    answer_tokens: tuple[int, int] = (20, 60)
    reasoning_tokens: tuple[int, int] = (10, 40)
    cache_entries: int = 65_536
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = DEFAULT_RANDOM_KINDS
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    quota_mode: str = "window"

    def __post_init__(self) -> None:
        if self.first_token_latency_s < 0 or self.chunk_interval_s < 0:
            raise ValueError("latencies must be >= 0")
        if self.tokens_per_chunk is not None and self.tokens_per_chunk < 1:
            raise ValueError("tokens_per_chunk must be >= 1")
        for low, high in (self.answer_tokens, self.reasoning_tokens):
            if not 1 <= low <= high:
                raise ValueError("token ranges must satisfy 1 <= min <= max")
        if self.cache_entries < 0:
            raise ValueError("cache_entries must be >= 0")
        self._check_faults()
        for name in ("rpm", "tpm", "max_concurrency"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1 or None")
        if self.quota_mode not in QUOTA_MODES:
            raise ValueError(f"quota_mode must be one of {', '.join(QUOTA_MODES)}")

    def _check_faults(self) -> None:
        # A list from a caller or the CLI would make the frozen config unhashable.
        object.__setattr__(self, "fault_kinds", tuple(self.fault_kinds))
        if not 0 <= self.fault_rate <= 1:
            raise ValueError("fault_rate must be in [0, 1]")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        for spec in self.fault_kinds:
            try:
                parse_fault(spec)
            except ValueError as err:
                raise ValueError(f"fault_kinds entry {spec!r} {err}") from err
