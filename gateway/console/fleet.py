"""The console's Fleet page: the nodes found as ``moonq top`` finds them, scraped, one view out.

Discovery is the fresh entries of ``P:nodes`` (every live node re-announces its /metrics URL), the
scrape is each node's ``/metrics``, and the numbers are ``moonq.fleet.build_view``'s, the same
pure code ``moonq top`` draws. One ``FleetWatch`` per gateway process scrapes at most every
``REFRESH_S`` however many browsers watch, and keeps the previous round: rates are taken between
the last two rounds, so the first look shows the state now and rates from the next refresh on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio

from gateway.console.jobs import text
from moonq.fleet import (
    NODE_STALE_S,
    Samples,
    Scrape,
    View,
    budget_text,
    build_view,
    headroom,
    human,
    parse_exposition,
    seconds,
)
from moonq.keys import Keys

REFRESH_S = 2.0  # the page asks this often; a scrape round is never closer to the last than this
SCRAPE_TIMEOUT_S = 1.5
# What a tenant's session is not shown: what the whole fleet spends (the other tenants' usage, summed).
SPEND_CELLS = frozenset({"tokens_per_hour", "tokens_per_min", "cost_per_hour", "cost_total"})


async def _scrape_node(http: httpx.AsyncClient, url: str) -> Samples | None:
    try:
        resp = await http.get(url)
        resp.raise_for_status()
        return parse_exposition(resp.text)
    except (httpx.HTTPError, ValueError):
        return None


class FleetWatch:
    """Scrape rounds shared by every viewer of one gateway process."""

    def __init__(self, redis_of: Callable[[], redis.asyncio.Redis], keys: Keys) -> None:
        self._redis_of = redis_of
        self.keys = keys
        self.prev: Scrape | None = None
        self.cur: Scrape | None = None
        self.note: str | None = None
        self._lock = asyncio.Lock()

    async def _round(self) -> Scrape:
        now = time.time()
        try:
            raw = await self._redis_of().zrangebyscore(self.keys.nodes, now - NODE_STALE_S, "+inf")
            urls, self.note = sorted({text(u) for u in raw}), None
        except (redis.RedisError, OSError) as err:
            urls, self.note = [], f"redis: no answer ({type(err).__name__})"
        # Metrics endpoints are inside the fleet's network: no proxies from the environment.
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False) as http:
            samples = await asyncio.gather(*(_scrape_node(http, url) for url in urls))
        return Scrape(now, dict(zip(urls, samples, strict=True)))

    async def view(self) -> tuple[View, Scrape, bool]:
        """The view of the last two rounds (a new round if the last is ``REFRESH_S`` old), its round,
        and whether it has rates (False on the first round)."""
        async with self._lock:
            if self.cur is None or time.time() - self.cur.at >= REFRESH_S * 0.9:
                self.prev, self.cur = self.cur, await self._round()
            prev, cur = self.prev, self.cur
        return build_view(prev or cur, cur), cur, prev is not None

    async def snapshot(self) -> dict[str, Any]:
        """The page's numbers, as text ready to show (the page script only places them)."""
        view, cur, rated = await self.view()
        return describe(view, cur, rated, self.note)


def _of(x: float | None, cap: float | None) -> str:
    if x is None:
        return "-"
    return f"{human(x)} of {human(cap)}" if cap else human(x)


def describe(view: View, cur: Scrape, rated: bool, note: str | None) -> dict[str, Any]:
    """The view as the Fleet page's cells: ``{name: text}``, plus lists of limits, tenants, nodes and notes."""
    dash = "-" if not rated else None
    total_jobs = sum(view.outcomes_per_s.values())
    failed_share = view.outcomes_per_s.get("failed", 0.0) / total_jobs if total_jobs else 0.0
    limits = []
    for name, (available, limit) in headroom(cur.up).items():
        # In flight: free slots of the cap. RPM and TPM: room in the sliding window now (the limit less the
        # grants of the last window); below 0 while usage exceeded its estimates (worker/limiter_state.py).
        slots = name == "inflight" and available is not None
        limits.append(
            {
                "name": name,
                "available": "-" if available is None else human(round(available, 1)),
                "limit": human(limit) + ("" if name == "inflight" else "/min"),
                "note": "" if slots else "sliding window: room now",
                "used": max(0.0, limit - (available or 0.0)) if slots else None,
                "max": limit,
            }
        )
    notes = [note] if note else []
    if not view.nodes_known:
        notes.append(f"no nodes: none announced in Redis in the last {NODE_STALE_S:.0f} s (MOONQ_PREFIX?)")
    if not rated:
        notes.append(f"rates from the next refresh ({REFRESH_S:.0f} s)")
    return {
        "cells": {
            "at": time.strftime("%H:%M:%S", time.localtime(view.at)),
            "interval": f"{view.interval_s:.1f} s" if rated else "-",
            "nodes": f"{view.nodes_up} up / {view.nodes_known} known",
            "queue": "-" if view.queue_depth is None else human(view.queue_depth),
            "in_flight": _of(view.in_flight, view.inflight_cap),
            "throughput": dash or f"{view.jobs_per_s:.2f} jobs/s",
            "outcomes": dash or (", ".join(f"{k} {v:.2f}/s" for k, v in view.outcomes_per_s.items()) or "none"),
            "error_rate": dash or f"{failed_share:.1%} failed",
            "retries": dash or (", ".join(f"{k} {human(v)}" for k, v in view.retries.items()) or "none"),
            "tokens_per_hour": dash or human(round(view.tokens_per_min * 60)),
            "tokens_per_min": dash or f"{human(round(view.tokens_per_min))}/min",
            "requests_per_min": dash or f"{human(round(view.requests_per_min))}/min",
            "cost_per_hour": dash or f"${view.cost_per_hour:.4f}/h",
            "cost_total": "-" if view.cost_total is None else f"${view.cost_total:.4f}",
            "latency": dash or f"p50 {seconds(view.latency_s[0])}, p95 {seconds(view.latency_s[1])}",
            "ttft": dash or f"p50 {seconds(view.ttft_s[0])}, p95 {seconds(view.ttft_s[1])}",
            "cooldown": f"{view.cooldown_s:.1f} s left (upstream 429)" if view.cooldown_s else "none",
        },
        "in_flight": {"used": view.in_flight or 0.0, "max": view.inflight_cap or 0.0},
        "limits": limits,
        # One entry per tenant, as `moonq top`'s tenant rows; none without a tenants file (view.tenants).
        "tenants": [
            {
                "name": row.name,
                "throughput": dash or f"{row.jobs_per_s:.2f} jobs/s",
                "outcomes": dash or (", ".join(f"{k} {v:.2f}/s" for k, v in row.outcomes_per_s.items()) or "none"),
                "tokens_per_min": dash or f"{human(round(row.tokens_per_min))}/min",
                "cost_per_hour": dash or f"${row.cost_per_hour:.4f}/h",
                "budget": budget_text(row),
            }
            for row in view.tenants
        ],
        "nodes": [{"url": url, "up": samples is not None} for url, samples in sorted(cur.nodes.items())],
        "notes": notes,
    }


def for_tenant(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The fleet's health as a tenant's session sees it: no spend cells, no tenant rows (the other
    tenants' usage) and no node addresses (the fleet's inner network); nodes up, queue, in flight,
    rates, latency and the limiter stay."""
    cells = {name: value for name, value in snapshot["cells"].items() if name not in SPEND_CELLS}
    return {**snapshot, "cells": cells, "tenants": [], "nodes": []}
