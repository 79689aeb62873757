"""``moonq top``'s loop: find the nodes, scrape them all at once, redraw every interval.

Nodes are the fresh entries of ``P:nodes`` (every live node re-announces its /metrics URL every
few seconds) plus any ``--node URL``. A node that does not answer in time, or answers something
that is not an exposition, is shown as down; Redis not answering only loses discovery.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

import httpx
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from console.fleetview import Samples, Scrape, build_view, format_screen, parse_exposition
from moonq.keys import Keys
from moonq.settings import ClientSettings

NODE_STALE_S = 30.0  # a node that has not announced itself for this long is gone
CLEAR = "\x1b[H\x1b[2J"


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


def draw(out: TextIO, lines: list[str], *, clear: bool = False, gap: bool = False) -> None:
    """The lines, after clearing the terminal (``clear``) or followed by a blank line (``gap``)."""
    text = "\n".join(lines) + "\n"
    out.write((CLEAR if clear else "") + text + ("\n" if gap else ""))
    out.flush()


class Top:
    """The scraping side: a Redis client for discovery, an HTTP client and a thread pool for scrapes."""

    def __init__(self, settings: ClientSettings, explicit: Sequence[str], interval_s: float) -> None:
        self.keys, self.explicit = settings.keys, list(explicit)
        # One try per round, no backoff: a Redis that does not answer must not stall the screen.
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        # Metrics endpoints are inside the fleet's network: no proxies from the environment.
        self.http = httpx.Client(timeout=min(2.0, max(0.5, interval_s / 2)), trust_env=False)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="moonq-top")
        self.note: str | None = None

    def round(self) -> Scrape:
        urls, self.note = discover(self.redis, self.keys, self.explicit, time.time())
        return scrape(self.http, self.pool, urls)

    def screen(self, prev: Scrape, cur: Scrape) -> list[str]:
        lines = format_screen(build_view(prev, cur))
        return [*lines, self.note] if self.note else lines

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()
        self.redis.close()


def run_top(
    settings: ClientSettings, nodes: Sequence[str], interval_s: float, *, once: bool, out: TextIO | None = None
) -> int:
    """Redraw every ``interval_s`` until Ctrl-C (exit 0); ``once``: one snapshot from two scrapes, then exit."""
    out = out or sys.stdout
    if interval_s <= 0:
        print("moonq top: --interval must be above 0", file=sys.stderr)
        return 2
    live = not once and out.isatty()
    top = Top(settings, nodes, interval_s)
    try:
        prev = top.round()
        if live:
            draw(out, [f"moonq top: {len(prev.nodes)} node(s), first numbers in {interval_s:g} s"], clear=True)
        while True:
            time.sleep(max(0.0, prev.at + interval_s - time.time()))
            cur = top.round()
            draw(out, top.screen(prev, cur), clear=live, gap=not live and not once)
            if once:
                return 0
            prev = cur
    except KeyboardInterrupt:
        return 0
    finally:
        top.close()
