"""The shared Redis clients' connections: packed by hiredis, and cheap to open in a burst (moonq/connect.py)."""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Any

import pytest
import redis
from redis.asyncio.connection import Connection as AsyncConnection

from harness import RedisServer
from moonq.connect import HiredisPacking, resilient_redis
from moonq.redisurl import DRIVER_INFO, sync_redis


class _Packer(HiredisPacking, AsyncConnection):
    pass


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "a" * 40, 3, "P:job:{x}:1", "P:log:{x}:1", "P:events:{x}:1", b"\x00\xffbody", 1.5, 7),
        ("SET", "k", "v" * 10_000),
        ("CONFIG GET", "maxmemory"),  # a two-word name: redis-py's own packing
        ("HSET", "k", "f", memoryview(b"view")),  # a type hiredis does not take: redis-py's own packing
    ],
)
def test_hiredis_packs_the_same_bytes_as_redis_py(command: tuple[Any, ...]) -> None:
    ours, theirs = _Packer(), AsyncConnection()
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))


def test_a_burst_of_new_connections_looks_up_no_package_metadata(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py reads its version from the installed packages' metadata for every connection it opens unless
    # told it; a node opening 200 connections in a burst of job starts spent 7% of its CPU there.
    lookups: list[str] = []
    real = metadata.version

    def counting(name: str) -> str:
        lookups.append(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", counting)

    async def burst() -> list[Any]:
        client = resilient_redis(redis_server.url, max_connections=50)
        try:
            await asyncio.gather(*(client.blpop([f"nothing:{i}"], timeout=0.2) for i in range(50)))
            return [c.driver_info for c in client.connection_pool._available_connections]
        finally:
            await client.aclose()

    infos = asyncio.run(burst())
    sync = sync_redis(redis_server.url)
    try:
        sync.ping()
        sync_info = sync.connection_pool.get_connection().driver_info
    finally:
        sync.close()
    assert len(infos) == 50 and all(info is DRIVER_INFO for info in infos)
    assert sync_info is DRIVER_INFO
    assert lookups == []
    # What Redis 7.2+ is told (CLIENT SETINFO) is what redis-py would have told it.
    assert (DRIVER_INFO.formatted_name, DRIVER_INFO.lib_version) == ("redis-py", redis.__version__)
