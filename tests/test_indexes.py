"""Fleet-wide lists merged from the per-group indexes (moonq/indexes.py), against a brute-force merge."""

from __future__ import annotations

import asyncio
import random
import uuid

import redis
import redis.asyncio

from moonq.indexes import newest_first, newest_first_async, total_async


def test_every_page_is_the_brute_force_merge_shallow_or_by_score(r: redis.Redis, redis_url: str) -> None:
    rng = random.Random(7)
    base = f"idx{uuid.uuid4().hex[:6]}"
    indexes = [f"{base}:{g}" for g in range(16)]
    everything: dict[str, float] = {}
    for n in range(6000):
        # Whole seconds: many ties, within and across indexes (a burst of submits in one clock tick).
        score = float(1_700_000_000 + rng.randrange(2000))
        member = f"m{n:05d}"
        everything[member] = score
        r.zadd(indexes[rng.randrange(16)], {member: score})
    expected = sorted(everything.items(), key=lambda kv: -kv[1])

    async def pages() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
        try:
            assert await total_async(client, indexes) == 6000
            for offset, count in ((0, 50), (0, 2000), (2500, 50), (2500, 1000), (5990, 50), (6000, 5), (5999, 1)):
                got = await newest_first_async(client, indexes, count, offset=offset)
                want = expected[offset : offset + count]
                # Among equal scores the order is free: compare the scores, and the members as sets per score.
                assert [s for _, s in got] == [s for _, s in want], (offset, count)
                assert _by_score(got) == _by_score(want) or _edges_only(got, want), (offset, count)
        finally:
            await client.aclose()

    asyncio.run(pages())
    assert [s for _, s in newest_first(r, indexes, 100, offset=200)] == [s for _, s in expected[200:300]]
    r.delete(*indexes)


def _by_score(rows: list[tuple[str, float]]) -> dict[float, set[str]]:
    out: dict[float, set[str]] = {}
    for member, score in rows:
        out.setdefault(score, set()).add(member)
    return out


def _edges_only(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    """Members differ only within the page's first and last score (ties cut by the page's ends)."""
    a, b = _by_score(got), _by_score(want)
    edges = {got[0][1], got[-1][1]} if got else set()
    return all(a[s] == b[s] for s in a if s not in edges)
