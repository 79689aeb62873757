"""Reported usage → token counts and dollars: moved to the core, ``moonq/usage.py``.

The gateway's web console prices jobs too, and the gateway may not import worker code; the
names stay importable from here for the node's modules.
"""

from __future__ import annotations

from moonq.usage import (
    DEFAULT_PRICES,
    MAX_USAGE_TOKENS,
    NOT_NULL_COUNTS,
    USAGE_COUNTS,
    USAGE_DETAIL_COUNTS,
    Price,
    cost_usd,
    load_prices,
    token_counts,
    total_tokens,
    usage_problem,
)

__all__ = [
    "DEFAULT_PRICES",
    "MAX_USAGE_TOKENS",
    "NOT_NULL_COUNTS",
    "USAGE_COUNTS",
    "USAGE_DETAIL_COUNTS",
    "Price",
    "cost_usd",
    "load_prices",
    "token_counts",
    "total_tokens",
    "usage_problem",
]
