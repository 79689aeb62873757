"""Reported usage → token counts by type, and → dollars (pure functions).

Moonshot reports ``cached_tokens`` at the top of ``usage``, inside ``prompt_tokens_details``,
or both (docs/moonshot-api.md §3); ``prompt_tokens`` already includes them. Reasoning tokens are
counted when the upstream reports ``completion_tokens_details.reasoning_tokens``.

Prices are USD per million tokens: cache-hit input, cache-miss input, output. The defaults
below are Moonshot's published list prices as we know them (kimi-k2.5's are quoted in
docs/moonshot-api.md §10); they change, so check your console and override them with
``MOONQ_PRICES_FILE`` (JSON: ``{"model": {"input_cache_hit": .., "input_cache_miss": .., "output": ..}}``).
Models without a price cost 0 and are counted as tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Price:
    input_cache_hit: float
    input_cache_miss: float
    output: float


DEFAULT_PRICES: dict[str, Price] = {
    "kimi-k2.5": Price(0.10, 0.60, 3.00),
    "kimi-k2.6": Price(0.10, 0.60, 3.00),
    "kimi-k2-0905-preview": Price(0.15, 0.60, 2.50),
    "kimi-k2-0711-preview": Price(0.15, 0.60, 2.50),
    "kimi-k2-turbo-preview": Price(0.15, 1.15, 8.00),
    "kimi-k2-thinking": Price(0.15, 0.60, 2.50),
    "kimi-k2-thinking-turbo": Price(0.15, 1.15, 8.00),
    "moonshot-v1-8k": Price(0.20, 0.20, 2.00),
    "moonshot-v1-32k": Price(1.00, 1.00, 3.00),
    "moonshot-v1-128k": Price(2.00, 2.00, 5.00),
}


def token_counts(usage: dict[str, Any] | None) -> dict[str, int]:
    """``{prompt, completion, cached, reasoning}`` from a usage object, whichever spelling it used."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = usage.get("cached_tokens")
    if cached is None:
        cached = details.get("cached_tokens")
    return {
        "prompt": int(usage.get("prompt_tokens") or 0),
        "completion": int(usage.get("completion_tokens") or 0),
        "cached": int(cached or 0),
        "reasoning": int(completion_details.get("reasoning_tokens") or 0),
    }


def cost_usd(counts: dict[str, int], price: Price | None) -> float:
    if price is None:
        return 0.0
    cached = min(counts["cached"], counts["prompt"])
    return (
        cached * price.input_cache_hit
        + (counts["prompt"] - cached) * price.input_cache_miss
        + counts["completion"] * price.output
    ) / 1_000_000


def load_prices(path: str | None) -> dict[str, Price]:
    """The default table, with a JSON file's entries laid over it."""
    prices = dict(DEFAULT_PRICES)
    if path:
        raw = json.loads(Path(path).read_text())
        for model, entry in raw.items():
            prices[model] = Price(
                float(entry["input_cache_hit"]), float(entry["input_cache_miss"]), float(entry["output"])
            )
    return prices
