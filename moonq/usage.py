"""Reported usage → token counts by type, and → dollars (pure functions).

In the core because both sides price a job: a node for its metrics (worker/job.py), the
gateway's web console for its job pages (gateway/console/jobs.py).

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
import math
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


# Far above what one call can use (a 256k-token context, a handful of choices), far below a count that
# would put the fleet's TPM bucket into a debt of years once refunded (worker/ratelimit.py).
MAX_USAGE_TOKENS = 100_000_000
# The counts moonq reads, at the top of ``usage`` and in its ``*_details`` objects (docs/moonshot-api.md §3).
USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
USAGE_DETAIL_COUNTS = {"prompt_tokens_details": ("cached_tokens",), "completion_tokens_details": ("reasoning_tokens",)}
# Counts that may be absent but never null: a reader's usage has them as plain ints (moonq/wire.py Usage).
NOT_NULL_COUNTS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def _count(value: Any) -> int | None:
    """``value`` as a token count: a whole number in [0, MAX_USAGE_TOKENS] (12.0 counts), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_USAGE_TOKENS else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return _count(int(value))
    return None


def usage_problem(usage: Any) -> str | None:
    """Why a reported usage cannot be counted, or None when every count moonq reads is a count.

    A count may be absent (``cached_tokens`` and the details' counts also null); present, it must
    be a whole number of tokens from 0 to ``MAX_USAGE_TOKENS``. A NaN or Infinity in the upstream's
    JSON reads as null (worker/upstream.py), so a null prompt, completion or total is refused too.
    Fields moonq does not read are not looked at.
    """
    if not isinstance(usage, dict):
        return f"usage is not an object: {str(usage)[:100]!r}"
    parts: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [("", usage, USAGE_COUNTS)]
    for details_name, detail_counts in USAGE_DETAIL_COUNTS.items():
        details = usage.get(details_name)
        if details is not None and not isinstance(details, dict):
            return f"usage.{details_name} is not an object"
        parts.append((f"{details_name}.", details or {}, detail_counts))
    for path, part, names in parts:
        for name in names:
            if name not in part or (part[name] is None and (path or name not in NOT_NULL_COUNTS)):
                continue
            if _count(part[name]) is None:
                return f"usage.{path}{name} is not a token count: {str(part[name])[:100]!r}"
    return None


def token_counts(usage: dict[str, Any] | None) -> dict[str, int]:
    """``{prompt, completion, cached, reasoning}`` from a usage object, whichever spelling it used.

    Never raises: a count that is not one (``usage_problem``) reads as 0.
    """
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    completion_details = usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    cached = usage.get("cached_tokens")
    if cached is None:
        cached = details.get("cached_tokens")
    return {
        "prompt": _count(usage.get("prompt_tokens")) or 0,
        "completion": _count(usage.get("completion_tokens")) or 0,
        "cached": _count(cached) or 0,
        "reasoning": _count(completion_details.get("reasoning_tokens")) or 0,
    }


def total_tokens(usage: dict[str, Any] | None) -> int | None:
    """The call's ``total_tokens`` (what the limiter refunds against), or None when not known."""
    return _count(usage.get("total_tokens")) if isinstance(usage, dict) else None


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
