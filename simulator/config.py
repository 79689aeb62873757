"""Simulator configuration: one frozen object built at the entry point and passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulator instance.

    Attributes:
        seed: mixed into every generated answer; two servers with the same seed answer alike.
        first_token_latency_s: pause before the first stream chunk (and before a non-stream body).
        chunk_interval_s: pause between stream chunks.
        tokens_per_chunk: tokens per content fragment; ``None`` varies it between 1 and 3 like the real API.
        answer_tokens: (min, max) length of a plain text answer, in tokens.
        reasoning_tokens: (min, max) length of the reasoning of thinking models, in tokens.
        cache_entries: how many message-prefix hashes the context cache remembers (LRU).
    """

    seed: int = 0
    first_token_latency_s: float = 0.0
    chunk_interval_s: float = 0.0
    tokens_per_chunk: int | None = None
    answer_tokens: tuple[int, int] = (20, 60)
    reasoning_tokens: tuple[int, int] = (10, 40)
    cache_entries: int = 65_536

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
