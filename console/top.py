"""``moonq top``'s loop: find the nodes, scrape them all at once, redraw every interval.

On a terminal the screen is a rich table redrawn in place (``rich.live.Live``); otherwise (piped,
or ``--once``) each screen is printed as plain lines, the format ``console/fleetview.py`` gives
(the numbers are ``moonq/fleet.py``'s, which the gateway's web console shows too).
Nodes are the fresh entries of ``P:nodes`` (every live node re-announces its /metrics URL every
few seconds) plus any ``--node URL``. A node that does not answer in time, or answers something
that is not an exposition, is shown as down; Redis not answering only loses discovery.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

import httpx
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from console.fleetview import deliveries_row, screen_line, screen_rows
from moonq.fleet import NODE_STALE_S, Samples, Scrape, build_view, parse_exposition
from moonq.keys import Keys
from moonq.redisurl import sync_redis
from moonq.settings import ClientSettings


def discover(r: redis.Redis, keys: Keys, explicit: Sequence[str], now: float) -> tuple[list[str], str | None]:
    """The nodes to scrape (fresh announcements and ``explicit``), and a note if Redis did not answer."""
    try:
        fresh: list[bytes] = r.zrangebyscore(keys.nodes, now - NODE_STALE_S, "+inf")  # type: ignore[assignment]
    except (redis.RedisError, OSError) as err:
        return sorted(set(explicit)), f"redis: no answer ({type(err).__name__}); showing --node URLs only"
    return sorted({*explicit, *(url.decode() for url in fresh)}), None


def scrape_node(http: httpx.Client, url: str) -> Samples | None:
    """One node's samples, or None if it is down (no answer, an error status, not an exposition)."""
    try:
        resp = http.get(url)
        resp.raise_for_status()
        return parse_exposition(resp.text)
    except (httpx.HTTPError, ValueError):
        return None


def scrape(http: httpx.Client, pool: ThreadPoolExecutor, urls: Sequence[str]) -> Scrape:
    """Every node concurrently; each is bounded by ``http``'s timeout."""
    at = time.time()
    return Scrape(at, dict(zip(urls, pool.map(lambda url: scrape_node(http, url), urls), strict=True)))


def draw(out: TextIO, lines: list[str], *, gap: bool = False) -> None:
    """The lines, followed by a blank line when ``gap`` (to separate screens in a log)."""
    out.write("\n".join(lines) + "\n" + ("\n" if gap else ""))
    out.flush()


def table(rows: list[tuple[str, str]]) -> Table:
    """One screen for a terminal: label/value rows, the first (title) bold; notes and down nodes stand out."""
    grid = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for n, (label, value) in enumerate(rows):
        style = "bold" if n == 0 else "red" if label == "down" else "yellow" if not label else ""
        grid.add_row(label, Text(value, style=style))
    return grid


class Top:
    """The scraping side: a Redis client for discovery, an HTTP client and a thread pool for scrapes."""

    def __init__(self, settings: ClientSettings, explicit: Sequence[str], interval_s: float) -> None:
        self.keys, self.explicit = settings.keys, list(explicit)
        # One try per round, no backoff: a Redis that does not answer must not stall the screen.
        self.redis = sync_redis(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        # Metrics endpoints are inside the fleet's network: no proxies from the environment.
        self.http = httpx.Client(timeout=min(2.0, max(0.5, interval_s / 2)), trust_env=False)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="moonq-top")
        self.note: str | None = None
        self.stopped = threading.Event()  # set by Ctrl-C (run_top): the loop ends between rounds

    def round(self) -> Scrape:
        urls, self.note = discover(self.redis, self.keys, self.explicit, time.time())
        return scrape(self.http, self.pool, urls)

    def rows(self, prev: Scrape, cur: Scrape) -> list[tuple[str, str]]:
        """The screen's rows (``fleetview.screen_rows``), the delivery backlog, then the discovery note if any."""
        rows = screen_rows(build_view(prev, cur))
        backlog = deliveries_row(prev, cur)
        if backlog is not None:  # after the fleet's numbers, before the notes and the nodes that are down
            at = next((i for i, (label, _) in enumerate(rows) if not label or label == "down"), len(rows))
            rows.insert(at, backlog)
        return [*rows, ("", self.note)] if self.note else rows

    def next_round(self, prev: Scrape, interval_s: float) -> Scrape | None:
        """The round ``interval_s`` after ``prev`` started (sleeping until then); None once stopped."""
        if self.stopped.wait(max(0.0, prev.at + interval_s - time.time())):
            return None
        return self.round()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()
        self.redis.close()


def run_top(
    settings: ClientSettings, nodes: Sequence[str], interval_s: float, *, once: bool, out: TextIO | None = None
) -> int:
    """Redraw every ``interval_s`` until Ctrl-C (exit 0); ``once``: one snapshot from two scrapes, then exit.

    A live table on a terminal; else (``once``, or ``out`` is not a terminal) plain screens,
    each followed by a blank line unless ``once``.
    """
    out = out or sys.stdout
    if interval_s <= 0:
        print("moonq top: --interval must be above 0", file=sys.stderr)
        return 2
    top = Top(settings, nodes, interval_s)
    # Ctrl-C stops the loop between rounds rather than raising wherever the main thread is: a
    # KeyboardInterrupt inside a Redis or HTTP call can leave a lock taken that close() then waits on.
    previous = signal.signal(signal.SIGINT, lambda *_: top.stopped.set())
    try:
        if not once and out.isatty():
            _live(top, interval_s, out)
        else:
            _plain(top, interval_s, out, once=once)
    finally:
        signal.signal(signal.SIGINT, previous)
        top.close()
    return 0


def _plain(top: Top, interval_s: float, out: TextIO, *, once: bool) -> None:
    prev = top.round()
    while (cur := top.next_round(prev, interval_s)) is not None:
        draw(out, [screen_line(label, value) for label, value in top.rows(prev, cur)], gap=not once)
        if once:
            return
        prev = cur


def _live(top: Top, interval_s: float, out: TextIO) -> None:
    prev = top.round()
    first = Text(f"moonq top: {len(prev.nodes)} node(s), first numbers in {interval_s:g} s")
    # Redrawn only when a round is in (no refresh thread): the numbers change once per interval.
    with Live(first, console=Console(file=out), auto_refresh=False) as live:
        while (cur := top.next_round(prev, interval_s)) is not None:
            live.update(table(top.rows(prev, cur)), refresh=True)
            prev = cur
