"""CPU per relayed fragment on paced streams: one node beside direct httpx and aiohttp readers.

    python -m bench.fragment_cpu [--streams 100] [--fragments 400] [--rounds 3] [--no-write]

Real answers arrive at 30-100 tokens/s, one read each, so the figure that sizes a fleet is the
node's CPU per fragment when fragments come 20 ms apart (a 50 tokens/s stream), with each job's
start and end counted in. The simulator (its own process) answers every request with F one-token
fragments 20 ms apart. Per round, in turn on the same simulator:

- **moonq**: N jobs through one ``celery -A worker worker`` node with its defaults (``submit_many``,
  then every result awaited); the node's user + system CPU over the batch (``/proc/<pid>/stat``),
  divided by N x F. The node reads each stream, writes every delta to the job's replay log and
  channel, and runs the job's claim, limiter grant, retries bookkeeping and end. Beside it, Redis's
  CPU over the batch (``INFO cpu``) per fragment: one Redis serves the whole fleet on one core, so
  this caps the fragments per second a fleet can relay.
- **direct httpx** / **direct aiohttp**: N streams read at once by one asyncio client in a process of
  its own, every chunk's JSON decoded (no more: the floor of reading the stream in Python).

Medians of K rounds. The readers share two cores with the simulator and Redis; CPU time, not wall
time, is compared.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.fleets import API_KEY, REPO, node_env, source_tree
from bench.perf import Sim, cpu_s
from bench.report import write_section
from harness import RedisServer, WorkerProcess
from moonq.settings import ClientSettings
from producers import Client

SECTION = "## CPU per relayed fragment: paced streams, the node beside direct readers"
REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Count slowly."}]}
GOAL_US = 60.0

# A direct reader, run as its own process so its CPU is its own: prints its CPU seconds.
READER = r"""
import asyncio, json, sys, time
import aiohttp, httpx  # imported before the clock starts: only the reading is counted
kind, base, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Count slowly."}], "stream": True}
headers = {"Authorization": "Bearer " + sys.argv[4]}

async def with_httpx():
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=300) as client:
        async def one():
            async with client.stream("POST", "/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        json.loads(line[6:])
        await asyncio.gather(*(one() for _ in range(n)))

async def with_aiohttp():
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one():
            async with session.post(base + "/chat/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                        json.loads(line[6:])
        await asyncio.gather(*(one() for _ in range(n)))

started = time.process_time()
asyncio.run(with_httpx() if kind == "httpx" else with_aiohttp())
print(time.process_time() - started)
"""


@dataclass
class Round:
    node_us: float
    httpx_us: float
    aiohttp_us: float
    node_wall_s: float
    redis_us: float  # Redis's CPU per fragment while the node relayed
    before_us: float | None = None  # the baseline revision's node, with --baseline
    before_redis_us: float | None = None


def reader_us(kind: str, base_url: str, streams: int, fragments: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", READER, kind, base_url, str(streams), API_KEY],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(done.stdout.split()[-1]) / (streams * fragments) * 1e6


def redis_cpu_s(server: RedisServer) -> float:
    with redis.Redis.from_url(server.url) as client:
        cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def node_us(server: RedisServer, sim: Sim, tree: Path, streams: int, fragments: int) -> tuple[float, float, float]:
    """CPU per fragment of a node started from ``tree`` (this checkout or a baseline's) over one batch, the
    batch's wall time, and Redis's CPU per fragment over the batch."""
    prefix = f"fc{uuid.uuid4().hex[:6]}"
    env = node_env(server.url, sim.base_url, prefix, tree)
    with (
        WorkerProcess(env, cwd=tree) as node,
        Client(settings=ClientSettings(redis_url=server.url, prefix=prefix)) as client,
    ):
        assert node.proc is not None
        client.submit(REQUEST).result(timeout=60)  # warm: connections open, scripts loaded
        time.sleep(1.0)
        before, t0, redis_before = cpu_s(node.proc.pid), time.monotonic(), redis_cpu_s(server)
        for job in client.submit_many([REQUEST] * streams):
            job.result(timeout=600)
        n = streams * fragments
        per_fragment = (cpu_s(node.proc.pid) - before) / n * 1e6
        return per_fragment, time.monotonic() - t0, (redis_cpu_s(server) - redis_before) / n * 1e6


def one_round(streams: int, fragments: int, baseline: Path | None) -> Round:
    with (
        RedisServer() as server,
        Sim(latency_ms=20, chunk_ms=20, answer=(fragments, fragments), per_chunk=1) as sim,
    ):
        httpx_us = reader_us("httpx", sim.base_url, streams, fragments)
        before, _, before_redis = node_us(server, sim, baseline, streams, fragments) if baseline else (None, 0, None)
        now, wall, redis_now = node_us(server, sim, REPO, streams, fragments)
        aiohttp_us = reader_us("aiohttp", sim.base_url, streams, fragments)
    return Round(now, httpx_us, aiohttp_us, wall, redis_now, before, before_redis)


def section(rounds: list[Round], args: argparse.Namespace) -> str:
    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in rounds))

    node, hx, ah = med("node_us"), med("httpx_us"), med("aiohttp_us")
    met = "met" if node <= GOAL_US else "not met"
    before = med("before_us") if args.baseline else None
    redis_now = med("redis_us")
    redis_before = med("before_redis_us") if args.baseline else None
    command = f"python -m bench.fragment_cpu --streams {args.streams} --fragments {args.fragments}"
    command += f" --rounds {args.rounds}"
    if args.baseline:
        command += f" --baseline {args.baseline}"
    rows = [
        f"| moonq node (relays and records every fragment) | {node:.0f} us | {node / ah:.2f}x | {redis_now:.1f} us |"
    ]
    if before is not None and redis_before is not None:
        cells = f"{before:.0f} us | {before / ah:.2f}x | {redis_before:.1f} us"
        rows.insert(0, f"| moonq node before (`{args.baseline}`) | {cells} |")
    per_round = "; ".join(
        (f"{r.before_us:.0f} / " if r.before_us is not None else "")
        + f"{r.node_us:.0f} / {r.httpx_us:.0f} / {r.aiohttp_us:.0f}"
        for r in rounds
    )
    ratio = f" The node now spends {node / before:.2f}x the CPU of `{args.baseline}`'s." if before else ""
    if redis_before:
        ratio += f" Redis spends {redis_now / redis_before:.2f}x what it did for `{args.baseline}`'s node."
    per_redis = "; ".join(
        (f"{r.before_redis_us:.1f} / " if r.before_redis_us is not None else "") + f"{r.redis_us:.1f}" for r in rounds
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"`{command}` (`make bench-fragment-cpu`). Machine as above. The simulator (its own process) answers"
            f" each request with {args.fragments} one-token fragments 20 ms apart (a 50 tokens/s stream);"
            f" {args.streams} streams at once. **moonq**: one `celery -A worker worker` node with its defaults, jobs"
            " by `submit_many`, the node's whole CPU over the batch (reading the streams, writing each delta to the"
            " replay log and the channel, and every job's claim, limiter grant and end) divided by the fragments."
            + (
                f" **before**: the node of `{args.baseline}` (its files, this environment), in the same rounds."
                if args.baseline
                else ""
            )
            + " **direct**: the same streams read by one asyncio client in a process of its own, each chunk's JSON"
            f" decoded, its CPU divided by the fragments. Medians of {args.rounds} rounds.",
            "",
            "| reader | CPU per fragment | vs direct aiohttp | Redis CPU per fragment |",
            "|---|---|---|---|",
            *rows,
            f"| direct asyncio httpx (reads only) | {hx:.0f} us | {hx / ah:.2f}x | - |",
            f"| direct asyncio aiohttp (reads only) | {ah:.0f} us | 1.00x | - |",
            "",
            f"Per round ({'before / ' if before else ''}node / httpx / aiohttp, us): {per_round}; Redis"
            f" ({'before / ' if before else ''}now, us): {per_redis}.{ratio} Goal: the"
            f" node at most {GOAL_US:.0f} us per fragment, {met}; one core relays {1e6 / node:,.0f} fragments/s at"
            " this figure.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--fragments", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a git revision whose node to measure beside this checkout's")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    rounds = []
    with source_tree(args.baseline) as base:
        for i in range(args.rounds):
            rounds.append(one_round(args.streams, args.fragments, base if args.baseline else None))
            r = rounds[-1]
            print(
                f"round {i + 1}: "
                + (f"before {r.before_us:.0f} us, " if r.before_us is not None else "")
                + f"node {r.node_us:.0f} us, httpx {r.httpx_us:.0f} us, aiohttp {r.aiohttp_us:.0f} us, "
                + (f"redis before {r.before_redis_us:.1f} us, " if r.before_redis_us is not None else "")
                + f"redis {r.redis_us:.1f} us",
                flush=True,
            )
    text = section(rounds, args)
    print(text)
    if not args.no_write:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
