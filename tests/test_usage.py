"""Usage → token counts (either placement and spelling) → dollars, and the price-table override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.metrics import model_label, reason_label, status_label
from worker.usage import DEFAULT_PRICES, Price, cost_usd, load_prices, token_counts


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"prompt_tokens": 82, "completion_tokens": 31, "total_tokens": 113, "cached_tokens": 64},
            {"prompt": 82, "completion": 31, "cached": 64, "reasoning": 0},
        ),
        (
            {"prompt_tokens": 82, "completion_tokens": 31, "prompt_tokens_details": {"cached_tokens": 64}},
            {"prompt": 82, "completion": 31, "cached": 64, "reasoning": 0},
        ),
        (
            {
                "prompt_tokens": 82,
                "completion_tokens": 31,
                "cached_tokens": 64,
                "prompt_tokens_details": {"cached_tokens": 64},
            },
            {"prompt": 82, "completion": 31, "cached": 64, "reasoning": 0},
        ),
        (
            {"prompt_tokens": 10, "completion_tokens": 500, "completion_tokens_details": {"reasoning_tokens": 420}},
            {"prompt": 10, "completion": 500, "cached": 0, "reasoning": 420},
        ),
        (None, {"prompt": 0, "completion": 0, "cached": 0, "reasoning": 0}),
    ],
    ids=["top-level-cached", "nested-cached", "both-spellings", "reasoning", "no-usage"],
)
def test_token_counts(usage: dict[str, Any] | None, expected: dict[str, int]) -> None:
    assert token_counts(usage) == expected


def test_cost_splits_cache_hits_from_misses() -> None:
    price = Price(input_cache_hit=0.10, input_cache_miss=0.60, output=3.00)  # kimi-k2.5, per 1M
    counts = {"prompt": 1_000_000, "completion": 1_000_000, "cached": 400_000, "reasoning": 0}
    assert cost_usd(counts, price) == pytest.approx(0.4 * 0.10 + 0.6 * 0.60 + 3.00)
    assert cost_usd(counts, None) == 0.0


def test_price_file_overrides_and_extends_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "kimi-k2.5": {"input_cache_hit": 0.05, "input_cache_miss": 0.5, "output": 2.5},
                "my-finetune": {"input_cache_hit": 1, "input_cache_miss": 2, "output": 3},
            }
        )
    )
    prices = load_prices(str(path))
    assert prices["kimi-k2.5"] == Price(0.05, 0.5, 2.5)
    assert prices["my-finetune"] == Price(1.0, 2.0, 3.0)
    assert prices["moonshot-v1-8k"] == DEFAULT_PRICES["moonshot-v1-8k"]


@pytest.mark.parametrize(
    ("fn", "value", "label"),
    [
        (model_label, "kimi-k2.5", "kimi-k2.5"),
        (model_label, "kimi-k9-typo", "other"),
        (status_label, 429, "429"),
        (status_label, 418, "4xx"),
        (status_label, 599, "5xx"),
        (status_label, None, "error"),
        (reason_label, "connection_dropped", "connection_dropped"),
        (reason_label, "some_new_error_type", "other"),
    ],
)
def test_labels_stay_bounded(fn: Any, value: Any, label: str) -> None:
    assert fn(value) == label
