"""Tenants' daily budgets: the key that counts a tenant's spend per UTC day, and when a budget is spent (pure).

A tenant's ``daily_tokens`` and ``daily_usd`` (moonq/tenants.py) cap what its jobs use per UTC day,
fleet-wide. The nodes add each succeeded job's usage to one hash per tenant and day,
``P:budget:<tenant>:<YYYY-MM-DD>`` = ``{tokens, usd}`` (worker/budgets.py); producers read it before they
enqueue, and the nodes again before they run a queued job. This module names the key, reads the
hash and decides; the I/O is the callers'. A day's key expires two days after its last write: long
enough to read yesterday's spend, and no key lives without a TTL.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from moonq.errors import TenantBudgetExceeded
from moonq.tenants import TenantConfig

# The hash's fields, in the order ``Spend.from_redis`` reads an HMGET of them.
TOKENS, USD = "tokens", "usd"
FIELDS = (TOKENS, USD)
# A day's key outlives its day by a day, and is not worth keeping longer.
TTL_S = 2 * 86400
# The status a job refused for its tenant's budget fails with: the gateway's answer to a refused submit.
HTTP_STATUS = 429


def utc_day(now_s: float) -> str:
    """The UTC day of the unix time ``now_s``, ``YYYY-MM-DD``: the day a spend counts to."""
    return datetime.datetime.fromtimestamp(now_s, datetime.UTC).date().isoformat()


def seconds_to_midnight(now_s: float) -> int:
    """Whole seconds from ``now_s`` to the next 00:00 UTC, when every budget is whole again (at least 1)."""
    return max(1, 86400 - int(now_s) % 86400)


def key(prefix: str, tenant: str, day: str) -> str:
    """The hash counting ``tenant``'s spend on ``day`` (tenant names are safe in keys: moonq/configfile.py)."""
    return f"{prefix}:budget:{tenant}:{day}"


@dataclass(frozen=True)
class Spend:
    """What a tenant's jobs used on one day, fleet-wide."""

    tokens: int = 0
    usd: float = 0.0

    @classmethod
    def from_redis(cls, values: Sequence[bytes | str | None]) -> Spend:
        """From an HMGET of ``FIELDS`` (absent fields and keys read as nothing spent)."""
        tokens, usd = values
        return cls(int(tokens or 0), float(usd or 0.0))


def check(tenant: str, config: TenantConfig, spend: Spend, day: str) -> None:
    """Raise if ``spend`` has used up one of the tenant's budgets (the tokens budget is checked first).

    A budget is spent once the spend reaches it: the job that crosses the line finishes, the next is refused.

    Raises:
        TenantBudgetExceeded: naming the tenant, the budget, its limit and the spend.
    """
    if config.daily_tokens is not None and spend.tokens >= config.daily_tokens:
        raise TenantBudgetExceeded(tenant, TOKENS, config.daily_tokens, spend.tokens, day)
    if config.daily_usd is not None and spend.usd >= config.daily_usd:
        raise TenantBudgetExceeded(tenant, USD, config.daily_usd, spend.usd, day)


def limits(config: TenantConfig) -> dict[str, float]:
    """The tenant's budgets by unit (``tokens``, ``usd``); empty when it has none, and then nothing reads its spend."""
    out: dict[str, float] = {}
    if config.daily_tokens is not None:
        out[TOKENS] = config.daily_tokens
    if config.daily_usd is not None:
        out[USD] = config.daily_usd
    return out
