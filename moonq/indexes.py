"""Reading the fleet-wide lists that are kept per group (moonq/keys.py): dead letters, recent jobs.

Each group's index is a sorted set of its jobs (or deliveries) by time; a list across the fleet is
their merge, newest first. A page at ``offset`` reads the top ``offset + count`` of every group (one
pipelined round trip, on a Redis Cluster one per shard) and merges them, so it costs
``groups x (offset + count)`` entries: fine near the top. The console pages deep into 100,000 jobs:
its reader finds a deep page by score (``_deep_page``) at a cost that does not grow with the offset.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

# A page whose every index's top (``offset + count`` entries each) adds up to at most this is merged from
# those tops; a larger one is found by score.
SHALLOW = 4000
# The bisection for a page's end stops once at most this many entries lie between its two scores.
BISECT_SLACK = 64


def _merge(replies: Sequence[Any], count: int, offset: int) -> list[tuple[str, float]]:
    rows = heapq.merge(
        *(
            ((m.decode() if isinstance(m, bytes) else str(m), float(score)) for m, score in reply or [])
            for reply in replies
        ),
        key=lambda row: -row[1],
    )
    return list(rows)[offset : offset + count]


def newest_first(
    client: redis.Redis, indexes: Sequence[str], count: int, *, offset: int = 0
) -> list[tuple[str, float]]:
    """``count`` ``(member, score)`` pairs of the union of the sorted sets ``indexes``, highest score
    first, skipping the first ``offset``."""
    with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zrevrange(index, 0, offset + count - 1, withscores=True)
        return _merge(pipe.execute(), count, offset)


async def newest_first_async(
    client: redis.asyncio.Redis, indexes: Sequence[str], count: int, *, offset: int = 0
) -> list[tuple[str, float]]:
    """As ``newest_first``, on an asyncio client; a page that would read more than ``SHALLOW`` entries
    that way is found by score instead (``_page_by_score``), so the console's last page of 100,000 jobs,
    or a filter's window of 2,000, costs about what its first 50 do."""
    if (offset + count) * len(indexes) <= SHALLOW:
        async with client.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zrevrange(index, 0, offset + count - 1, withscores=True)
            return _merge(await pipe.execute(), count, offset)
    return await _page_by_score(client, indexes, count, offset)


async def _page_by_score(
    client: redis.asyncio.Redis, indexes: Sequence[str], count: int, offset: int
) -> list[tuple[str, float]]:
    """The page at ``offset`` by bisecting the scores: ``ZCOUNT`` per index (O(log n) each) tells how many
    entries lie at or above a score, so some 30 pipelined rounds per end of the page find scores that
    bracket it within ``BISECT_SLACK`` entries (or ties); each index then gives only its entries
    between the two, merged."""

    async def at_or_above(score: float) -> int:
        async with client.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zcount(index, score, "+inf")
            return sum(int(n) for n in await pipe.execute())

    async with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zrange(index, 0, 0, withscores=True)
            pipe.zrevrange(index, 0, 0, withscores=True)
        ends = [float(score) for reply in await pipe.execute() for _, score in reply or []]
    if not ends:
        return []
    low, high = min(ends), max(ends) + 1.0
    total = await at_or_above(low)

    async def bracket(rank: int) -> tuple[float, float, int]:
        """Scores ``lo < hi`` with at_or_above(lo) > rank >= at_or_above(hi) = n_hi, close together."""
        lo, n_lo, hi, n_hi = low, total, high, 0
        while n_lo - n_hi > BISECT_SLACK:
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break  # ties: no score between them
            n = await at_or_above(mid)
            if n > rank:
                lo, n_lo = mid, n
            else:
                hi, n_hi = mid, n
        return lo, hi, n_hi

    if offset >= total:
        return []
    _, top, above = await bracket(offset)
    bottom = low if offset + count >= total else (await bracket(offset + count - 1))[0]
    async with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zrevrangebyscore(index, f"({top!r}", bottom, withscores=True)
        return _merge(await pipe.execute(), count, offset - above)


async def total_async(client: redis.asyncio.Redis, indexes: Sequence[str]) -> int:
    """The number of entries of all ``indexes`` together."""
    async with client.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zcard(index)
        return sum(int(n) for n in await pipe.execute())
