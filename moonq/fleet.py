"""The fleet's numbers: the nodes' /metrics text in, one view of the whole fleet out (pure).

Shared by ``moonq top`` (console/top.py draws it in a terminal) and the gateway's web console
(gateway/console/fleet.py serves it as a page); each does its own I/O: finding the nodes in
``P:nodes`` (fresh for ``NODE_STALE_S``) and scraping them. Everything here is pure (no I/O, no
clock).

A scrape of one node is a ``Samples`` dict, ``(sample name, sorted labels) -> value``. Rates
come from counter increases between two scrapes of the same node, summed over the nodes; a
node that restarted in between counts its new values as the increase. Latency quantiles are
Prometheus' ``histogram_quantile`` over the interval's bucket increases. Gauges that every node
reports fleet-wide (queue depth, limits, cool-down) are taken as the max over nodes, per-node
ones (jobs in progress) and totals since start (cost) as the sum.

The limiter's gauges carry an ``account`` label (``all``: the optional cap over every account). The
fleet's limit on an axis is the sum over the accounts, within the cap; with more than one account the
view also has a row per account: each limit's room now, its cool-down and how long it is still out of
rotation.

Per tenant (the ``tenant`` label, bounded by the tenants file: worker/metrics.py), the interval's
jobs by outcome, tokens and cost, and what is left of each daily budget today (the exporter's
fleet-wide ``moonq_tenant_budget`` less ``moonq_tenant_spend``, max over nodes). Without a tenants
file every job is ``default``'s and there is no budget: then there are no tenant rows at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from moonq.budgets import TOKENS, USD

NODE_STALE_S = 30.0  # a node that has not announced itself in P:nodes for this long is gone

Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, Labels]
Samples = dict[SampleKey, float]

# Sample names of counters and histograms (cumulative, reset only when the process restarts).
CUMULATIVE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def parse_exposition(text: str) -> Samples:
    """Samples of a Prometheus text exposition; raises ValueError if the text is not one."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _matches(labels: Labels, want: dict[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in want.items())


def reports(samples: Samples, name: str, **labels: str) -> bool:
    """Whether any series of ``name`` with (at least) these labels is present."""
    return any(n == name and _matches(lab, labels) for n, lab in samples)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` having these labels (0 when there is none)."""
    return sum(v for (n, lab), v in samples.items() if n == name and _matches(lab, labels))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """Sums of ``name`` per value of ``label`` (e.g. jobs per outcome), over series having ``labels``."""
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        key = dict(lab).get(label)
        if n == name and key is not None and _matches(lab, labels):
            out[key] = out.get(key, 0.0) + v
    return out


def fleet(nodes: Iterable[Samples], name: str, how: str = "sum", **labels: str) -> float | None:
    """Aggregate a per-node ``total`` over the nodes that report it: ``"sum"`` or ``"max"``.

    None when no node reports it (e.g. a limit that is not configured).
    """
    values = [total(s, name, **labels) for s in nodes if reports(s, name, **labels)]
    if not values:
        return None
    return max(values) if how == "max" else sum(values)


def counter_delta(prev: float | None, cur: float) -> float:
    """Increase of one counter between two scrapes.

    A counter that went down was reset (its node restarted), so its new value is the increase;
    a series absent before (``None``) counts from 0.
    """
    if prev is None or cur < prev:
        return cur
    return cur - prev


def is_reset(prev: Samples, cur: Samples) -> bool:
    """Whether the node restarted between two scrapes: a counter went down or a series was re-created."""
    for key, value in cur.items():
        old = prev.get(key)
        if old is None:
            continue
        if key[0].endswith(CUMULATIVE_SUFFIXES) and value < old:
            return True
        if key[0].endswith("_created") and value != old:
            return True
    return False


def node_delta(prev: Samples, cur: Samples) -> Samples:
    """Counter and histogram increases of one node between two scrapes (gauges left out).

    After a restart every series restarts from its new value at once, so a histogram's buckets
    stay consistent with each other (a per-series check could miss a bucket that grew past its
    old value since the restart).
    """
    base: Samples = {} if is_reset(prev, cur) else prev
    return {key: counter_delta(base.get(key), v) for key, v in cur.items() if key[0].endswith(CUMULATIVE_SUFFIXES)}


def add(many: Iterable[Samples]) -> Samples:
    """Series-wise sum of several nodes' samples."""
    out: Samples = {}
    for samples in many:
        for key, v in samples.items():
            out[key] = out.get(key, 0.0) + v
    return out


def buckets(samples: Samples, family: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative buckets ``(upper bound, count)`` of a histogram, summed over its matching series, by bound."""
    acc: dict[float, float] = {}
    for (n, lab), v in samples.items():
        le = dict(lab).get("le")
        if n == f"{family}_bucket" and le is not None and _matches(lab, labels):
            acc[float(le)] = acc.get(float(le), 0.0) + v
    return sorted(acc.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of cumulative buckets, as Prometheus' ``histogram_quantile``.

    Linear interpolation inside the bucket that holds rank ``q * count``, the first bucket
    starting at 0; a rank in the ``+Inf`` bucket gives the highest finite bound. None without
    observations or without a ``+Inf`` bucket.
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    if len(cumulative) < 2 or not math.isinf(cumulative[-1][0]) or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for i, (upper, count) in enumerate(cumulative[:-1]):
        if count >= rank:
            if i == 0 and upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return cumulative[-2][0]


@dataclass(frozen=True)
class Scrape:
    """One round of scrapes: when (unix s) and each node's samples by URL (None = did not answer)."""

    at: float
    nodes: dict[str, Samples | None]

    @property
    def up(self) -> list[Samples]:
        return [s for s in self.nodes.values() if s is not None]


@dataclass(frozen=True)
class TenantUsage:
    """One tenant's share of the interval, and its daily budgets today (UTC).

    ``budget`` and ``spend`` are keyed by unit (``tokens``, ``usd``); a unit without a budget is absent
    from ``budget``, and ``spend`` is empty where no node reports the tenant's spend (no tenants file).
    """

    name: str
    outcomes_per_s: dict[str, float] = field(default_factory=dict)
    tokens_per_min: float = 0.0
    cost_per_hour: float = 0.0
    spend: dict[str, float] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)

    @property
    def jobs_per_s(self) -> float:
        return sum(self.outcomes_per_s.values())


@dataclass(frozen=True)
class AccountLimits:
    """One upstream account's limiter now, max over the nodes (each reads the same keys); ``all``: the cap.

    ``headroom`` is keyed by limit (``rpm``, ``tpm``, ``inflight``) as ``headroom`` gives it; ``cooldown_s``
    is None for the cap, which has none.
    """

    name: str
    headroom: dict[str, tuple[float | None, float]]
    cooldown_s: float | None = None
    out_s: float = 0.0


@dataclass(frozen=True)
class View:
    """What one screen shows: state now, and rates over the interval between two scrapes."""

    at: float
    interval_s: float
    nodes_up: int
    nodes_known: int
    down: tuple[str, ...] = ()
    new: int = 0  # up now, but not in the previous scrape: no rates from them until the next one
    queue_depth: float | None = None
    in_flight: float | None = None
    inflight_cap: float | None = None
    jobs_per_s: float = 0.0
    outcomes_per_s: dict[str, float] = field(default_factory=dict)
    tokens_per_min: float = 0.0
    tpm_limit: float | None = None
    requests_per_min: float = 0.0
    rpm_limit: float | None = None
    latency_s: tuple[float | None, float | None] = (None, None)  # p50, p95
    ttft_s: tuple[float | None, float | None] = (None, None)
    failed: float = 0.0
    retries: dict[str, float] = field(default_factory=dict)
    cost_per_hour: float = 0.0
    cost_total: float | None = None
    cooldown_s: float | None = None
    tenants: tuple[TenantUsage, ...] = ()  # empty with one tenant and no budget (no tenants file)
    accounts: tuple[AccountLimits, ...] = ()  # empty with one upstream account (no accounts file)


def fleet_delta(prev: Scrape, cur: Scrape) -> Samples:
    """Counter increases summed over the nodes that answered both scrapes."""
    pairs = ((prev.nodes.get(url), now) for url, now in cur.nodes.items())
    return add(node_delta(before, now) for before, now in pairs if before is not None and now is not None)


def _p50_p95(delta: Samples, family: str) -> tuple[float | None, float | None]:
    cumulative = buckets(delta, family)
    return histogram_quantile(0.5, cumulative), histogram_quantile(0.95, cumulative)


def _largest_first(counts: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v}


def build_view(prev: Scrape, cur: Scrape) -> View:
    """The screen's numbers from two consecutive scrapes."""
    up, d = cur.up, fleet_delta(prev, cur)
    dt = max(cur.at - prev.at, 1e-6)
    outcomes = by_label(d, "moonq_jobs_total", "outcome")
    tokens = total(d, "moonq_tokens_total", type="prompt") + total(d, "moonq_tokens_total", type="completion")
    return View(
        at=cur.at,
        interval_s=dt,
        nodes_up=len(up),
        nodes_known=len(cur.nodes),
        down=tuple(sorted(url for url, s in cur.nodes.items() if s is None)),
        new=sum(1 for url, s in cur.nodes.items() if s is not None and prev.nodes.get(url) is None),
        queue_depth=fleet(up, "moonq_queue_depth", "max"),
        in_flight=fleet(up, "moonq_jobs_in_progress"),
        inflight_cap=pooled(up, "moonq_ratelimit_limit", "inflight"),
        jobs_per_s=sum(outcomes.values()) / dt,
        outcomes_per_s={k: v / dt for k, v in _largest_first(outcomes).items()},
        tokens_per_min=tokens / dt * 60,
        tpm_limit=pooled(up, "moonq_ratelimit_limit", "tpm"),
        requests_per_min=total(d, "moonq_upstream_request_duration_seconds_count") / dt * 60,
        rpm_limit=pooled(up, "moonq_ratelimit_limit", "rpm"),
        latency_s=_p50_p95(d, "moonq_job_duration_seconds"),
        ttft_s=_p50_p95(d, "moonq_time_to_first_token_seconds"),
        failed=outcomes.get("failed", 0.0),
        retries=_largest_first(by_label(d, "moonq_retries_total", "reason")),
        cost_per_hour=total(d, "moonq_cost_usd_total") / dt * 3600,
        cost_total=fleet(up, "moonq_cost_usd_total"),
        cooldown_s=_longest(up, "moonq_ratelimit_cooldown_seconds"),
        tenants=tenant_usage(up, d, dt),
        accounts=account_limits(up),
    )


def _tenant_names(up: Iterable[Samples]) -> list[str]:
    """Every value of a ``tenant`` label the nodes report (jobs, tokens, waits, spend, budgets)."""
    return sorted({name for samples in up for _, labels in samples for key, name in labels if key == "tenant"})


def tenant_usage(up: list[Samples], delta: Samples, dt: float) -> tuple[TenantUsage, ...]:
    """Per tenant: the interval's rates from ``delta`` over ``dt`` seconds, and budgets now from ``up``.

    Empty when there is only one tenant and no budget: without a tenants file a ``default`` row
    would repeat the fleet's numbers.
    """
    rows = []
    for name in _tenant_names(up):
        outcomes = by_label(delta, "moonq_jobs_total", "outcome", tenant=name)
        tokens = sum(total(delta, "moonq_tokens_total", type=kind, tenant=name) for kind in ("prompt", "completion"))
        rows.append(
            TenantUsage(
                name=name,
                outcomes_per_s={k: v / dt for k, v in _largest_first(outcomes).items()},
                tokens_per_min=tokens / dt * 60,
                cost_per_hour=total(delta, "moonq_cost_usd_total", tenant=name) / dt * 3600,
                spend=_per_unit(up, "moonq_tenant_spend", name),
                budget=_per_unit(up, "moonq_tenant_budget", name),
            )
        )
    if len(rows) <= 1 and not any(row.budget for row in rows):
        return ()
    return tuple(rows)


def _per_unit(up: list[Samples], name: str, tenant: str) -> dict[str, float]:
    """A fleet-wide per-tenant gauge by unit: every node reads the same key, so the max over nodes."""
    out: dict[str, float] = {}
    for unit in (TOKENS, USD):
        value = fleet(up, name, "max", tenant=tenant, unit=unit)
        if value is not None:
            out[unit] = value
    return out


def human(x: float) -> str:
    """A count or rate, short: whole numbers below 10000 exactly, else 0.25, 12.5, 950, 12.5k, 5.0M."""
    if x == int(x) and abs(x) < 1e4:
        return str(int(x))
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}" if abs(x) < 100 * size else f"{x / size:.0f}{unit}"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def seconds(x: float | None) -> str:
    """A duration for the screen; ``-`` when unknown (no observation in the interval)."""
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def budget_text(row: TenantUsage) -> str:
    """A tenant's budgets today as text: what is left of each (below 0 once running jobs overshot it), or its
    spend when it has no budget."""
    if row.budget:
        parts = []
        for unit, cap in row.budget.items():
            left = cap - row.spend.get(unit, 0.0)
            parts.append(f"${left:.4f} of ${cap:.4f}" if unit == USD else f"{human(left)} of {human(cap)} tokens")
        return "left today " + ", ".join(parts)
    if row.spend:
        return f"no budget (today {human(row.spend.get(TOKENS, 0.0))} tokens, ${row.spend.get(USD, 0.0):.4f})"
    return "no budget"


# The fleet limiter's limits as its gauges name them (moonq_ratelimit_limit{limit=...}).
LIMITS = ("rpm", "tpm", "inflight")


def headroom(up: Iterable[Samples], **labels: str) -> dict[str, tuple[float | None, float]]:
    """Per configured limit: ``(available now, limit)``; a limit no node reports is left out.

    Every node reports the fleet's shared limiter, so each is the max over the nodes
    (``moonq_ratelimit_available`` and ``moonq_ratelimit_limit``, worker/exporter.py): of the fleet as
    ``pooled`` adds its accounts up, or of one account with ``account=name``.
    """
    nodes = list(up)
    out: dict[str, tuple[float | None, float]] = {}
    for name in LIMITS:
        if labels:
            limit = fleet(nodes, "moonq_ratelimit_limit", "max", limit=name, **labels)
            available = fleet(nodes, "moonq_ratelimit_available", "max", limit=name, **labels)
        else:
            limit = pooled(nodes, "moonq_ratelimit_limit", name)
            available = pooled(nodes, "moonq_ratelimit_available", name)
        if limit is not None:
            out[name] = (available, limit)
    return out


CAP = "all"  # the account label of the cap over all accounts


def _per_account(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """``name``'s series by account; a node from before accounts (no label) is one account, ``""``."""
    return {dict(lab).get("account", ""): v for (n, lab), v in samples.items() if n == name and _matches(lab, labels)}


def pooled(nodes: Iterable[Samples], name: str, limit: str) -> float | None:
    """The fleet's ``moonq_ratelimit_limit`` or ``_available`` on ``limit``: the sum over its accounts, at most the
    cap's; max over nodes. None where no node reports it; an account without that limit leaves the sum unlimited.
    """
    values = []
    for samples in nodes:
        per = _per_account(samples, name, limit=limit)
        cap = per.pop(CAP, None)
        every = set(_per_account(samples, "moonq_ratelimit_cooldown_seconds")) <= set(per)
        bounds = [v for v in (sum(per.values()) if per and every else None, cap) if v is not None]
        if bounds:
            values.append(min(bounds))
    return max(values) if values else None


def _longest(nodes: Iterable[Samples], name: str, **labels: str) -> float | None:
    """The largest series of ``name`` over nodes and accounts (None: no node reports it)."""
    values = [v for samples in nodes for v in _per_account(samples, name, **labels).values()]
    return max(values) if values else None


def account_limits(up: list[Samples]) -> tuple[AccountLimits, ...]:
    """Each account's limiter now, the cap (``all``) last; empty with one account (the fleet's rows say it all)."""
    names = {a for s in up for a in _per_account(s, "moonq_ratelimit_cooldown_seconds")}
    names |= {a for s in up for a in _per_account(s, "moonq_ratelimit_limit")}
    names.discard(CAP)
    if len(names) <= 1:
        return ()
    rows = [
        AccountLimits(
            name=name,
            headroom=headroom(up, account=name),
            cooldown_s=_longest(up, "moonq_ratelimit_cooldown_seconds", account=name),
            out_s=_longest(up, "moonq_account_out_of_rotation_seconds", account=name) or 0.0,
        )
        for name in sorted(names)
    ]
    cap = headroom(up, account=CAP)
    return (*rows, AccountLimits(CAP, cap)) if cap else tuple(rows)


def short_duration(x: float) -> str:
    """A wait for the screen, whole seconds up: 0s, 42s, 4m12s, 2h05m."""
    s = math.ceil(x)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def account_text(row: AccountLimits) -> str:
    """One account as text: each limit's room now of its limit, its cool-down, and ``OUT`` with the time left."""
    parts = [
        f"{name} {'-' if available is None else human(round(available, 1))}/{human(limit)} free"
        for name, (available, limit) in row.headroom.items()
    ]
    if row.cooldown_s is not None:
        parts.append(f"cooldown {short_duration(row.cooldown_s)}")
    return (
        f"{row.name}: " + (", ".join(parts) or "no limits") + (f" OUT {short_duration(row.out_s)}" if row.out_s else "")
    )
