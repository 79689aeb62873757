"""The gateway under many waiting callers: they share one pub/sub connection, the pool stays free."""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from gateway.app import GatewaySettings, create_app
from harness import RedisServer
from moonq.broker import queue_lists
from simulator.server import serve_in_thread

TOKEN = "gw-load-token"
BODY = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Wait for me."}]}
WAITERS = 120


def _clients(r: redis.Redis) -> int:
    return len(r.client_list())


def test_waiting_completions_leave_the_redis_pool_to_everyone_else() -> None:
    """120 non-streaming completions wait on jobs no node runs; an unrelated submit still goes through at once.

    Each waiting call once held a pub/sub connection of its own from the gateway's pool of 50, so the
    121st caller (any route) waited for one to free up (24 s, seen as a new user would).
    """
    with RedisServer() as server:  # of its own: its client count is the gateway's alone
        r = redis.Redis.from_url(server.url)
        settings = GatewaySettings(redis_url=server.url, gateway_tokens=TOKEN)
        with serve_in_thread(create_app(settings), lifespan=True) as url:
            baseline = _clients(r)

            async def main() -> tuple[float, int, int]:
                limits = httpx.Limits(max_connections=WAITERS + 10)
                headers = {"Authorization": f"Bearer {TOKEN}"}
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:
                    waiting = [
                        asyncio.create_task(http.post("/v1/chat/completions", json=BODY)) for _ in range(WAITERS)
                    ]
                    deadline = time.monotonic() + 30
                    while sum(r.llen(q) for q in queue_lists(settings)) < WAITERS:
                        assert time.monotonic() < deadline, "the completions were not all enqueued"
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)  # every caller is now waiting for its result
                    held = _clients(r) - baseline
                    subscribers = len(r.client_list(_type="pubsub"))
                    started = time.monotonic()
                    answer = await http.post("/v1/jobs", json=BODY)
                    took = time.monotonic() - started
                    assert answer.status_code == 202, answer.text
                    for task in waiting:
                        task.cancel()
                    await asyncio.gather(*waiting, return_exceptions=True)
                    return took, held, subscribers

            took, held, subscribers = asyncio.run(main())
            assert subscribers == 1, f"{subscribers} pub/sub connections for {WAITERS} waiting callers"
            # The rest (commands, the submit threads' own clients) is a handful, whatever the number of callers.
            assert held < WAITERS / 2, f"the gateway holds {held} Redis connections for {WAITERS} waiting callers"
            assert took < 5.0, f"an unrelated submit waited {took:.1f} s behind the waiting callers"
