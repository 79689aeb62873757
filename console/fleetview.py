"""``moonq top``'s screen: the fleet's view (moonq/fleet.py) as the lines of one screen (pure).

The arithmetic (scrapes in, a ``View`` out) lives in the core, ``moonq/fleet.py``, because the
gateway's web console shows the same numbers; this module lays them out for a terminal, and
``console/top.py`` scrapes and redraws. The names moved to the core are re-exported here, so
``from console.fleetview import build_view`` goes on working.
"""

from __future__ import annotations

import time

from moonq.fleet import (
    CUMULATIVE_SUFFIXES,
    AccountLimits,
    Labels,
    SampleKey,
    Samples,
    Scrape,
    TenantUsage,
    View,
    account_text,
    add,
    buckets,
    budget_text,
    build_view,
    by_label,
    counter_delta,
    fleet,
    fleet_delta,
    histogram_quantile,
    human,
    is_reset,
    node_delta,
    parse_exposition,
    reports,
    seconds,
    total,
)

__all__ = [
    "CUMULATIVE_SUFFIXES",
    "LABEL_WIDTH",
    "AccountLimits",
    "Labels",
    "SampleKey",
    "Samples",
    "Scrape",
    "TenantUsage",
    "View",
    "account_text",
    "add",
    "against",
    "buckets",
    "build_view",
    "by_label",
    "counter_delta",
    "deliveries_row",
    "fleet",
    "fleet_delta",
    "format_screen",
    "histogram_quantile",
    "human",
    "is_reset",
    "node_delta",
    "parse_exposition",
    "reports",
    "screen_line",
    "screen_rows",
    "seconds",
    "tenant_row",
    "total",
]


def against(rate: float, limit: float | None, unit: str) -> str:
    """``rate/min of LIMIT UNIT (pct%)``, or a note that no limit is set."""
    if not limit:
        return f"{human(rate)}/min (no {unit} limit)"
    return f"{human(rate)}/min of {human(limit)} {unit} ({rate / limit:.1%})"


def screen_rows(view: View) -> list[tuple[str, str]]:
    """One screen as ``(label, value)`` rows; the first is the title, a row with no label is a note."""
    clock = time.strftime("%H:%M:%S", time.localtime(view.at))
    depth = "-" if view.queue_depth is None else human(view.queue_depth)
    flight = "-" if view.in_flight is None else human(view.in_flight)
    cap = f" / {human(view.inflight_cap)} cap" if view.inflight_cap else ""
    outcomes = ", ".join(f"{k} {v:.2f}/s" for k, v in view.outcomes_per_s.items())
    spent = "-" if view.cost_total is None else f"${view.cost_total:.4f}"
    retries = ", ".join(f"{k} {human(v)}" for k, v in view.retries.items()) or "none"
    rows = [
        ("moonq top", f"{clock}   last {view.interval_s:.1f} s"),
        (
            "nodes",
            f"{view.nodes_up} up / {view.nodes_known} known"
            + (f" ({view.new} new: in the rates from the next interval)" if view.new else ""),
        ),
        ("queue", f"{depth} waiting | in flight {flight}{cap}"),
        ("throughput", f"{view.jobs_per_s:.2f} jobs/s" + (f" ({outcomes})" if outcomes else "")),
        ("tokens", against(view.tokens_per_min, view.tpm_limit, "TPM")),
        ("requests", against(view.requests_per_min, view.rpm_limit, "RPM")),
        (
            "latency",
            f"job p50 {seconds(view.latency_s[0])} p95 {seconds(view.latency_s[1])}"
            f" | first token p50 {seconds(view.ttft_s[0])} p95 {seconds(view.ttft_s[1])}",
        ),
        ("errors", f"{human(view.failed)} failed | retries: {retries}"),
        ("cost", f"${view.cost_per_hour:.4f}/h | {spent} since the nodes started"),
    ]
    if view.accounts:  # several upstream accounts: each one's limits, cool-down and rotation, in one row
        rows.append(("limits", " | ".join(account_text(row) for row in view.accounts)))
    elif view.cooldown_s:
        rows.append(("cool-down", f"{max(view.cooldown_s, 0.1):.1f} s left (upstream 429)"))
    rows.extend(tenant_row(row) for row in view.tenants)
    if not view.nodes_known:
        rows.append(("", "no nodes: none announced in Redis in the last 30 s (MOONQ_PREFIX? --node URL)"))
    rows.extend(("down", url) for url in view.down)
    return rows


def tenant_row(row: TenantUsage) -> tuple[str, str]:
    """One tenant's interval (jobs by outcome, tokens, cost) and its budgets today, as one row."""
    outcomes = ", ".join(f"{k} {v:.2f}/s" for k, v in row.outcomes_per_s.items())
    return (
        "tenant",
        f"{row.name}: {row.jobs_per_s:.2f} jobs/s"
        + (f" ({outcomes})" if outcomes else "")
        + f" | {human(row.tokens_per_min)} tokens/min | ${row.cost_per_hour:.4f}/h | {budget_text(row)}",
    )


def deliveries_row(prev: Scrape, cur: Scrape) -> tuple[str, str] | None:
    """The webhook and callback backlog (``moonq_webhook_backlog``, fleet-wide) and the interval's
    delivered rate, as one row; None when no node reports a backlog (older nodes)."""
    up = cur.up
    if not any(reports(s, "moonq_webhook_backlog") for s in up):
        return None
    state = {
        name: fleet(up, "moonq_webhook_backlog", "max", state=name) or 0.0 for name in ("queued", "retrying", "dead")
    }
    delivered = total(fleet_delta(prev, cur), "moonq_webhook_deliveries_total", outcome="delivered")
    rate = delivered / max(cur.at - prev.at, 1e-6)
    return (
        "deliveries",
        f"{human(state['queued'])} queued | {human(state['retrying'])} retrying | {human(state['dead'])} dead"
        f" | delivered {rate:.2f}/s",
    )


LABEL_WIDTH = 12  # the plain screen's label column


def screen_line(label: str, value: str) -> str:
    """One row as a plain line: the label padded to ``LABEL_WIDTH``, or the bare note."""
    return f"{label:<{LABEL_WIDTH}}{value}" if label else value


def format_screen(view: View) -> list[str]:
    """The lines of one screen (plain ASCII; the caller separates blocks)."""
    return [screen_line(label, value) for label, value in screen_rows(view)]
