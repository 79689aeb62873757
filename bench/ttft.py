"""Time to the first token through the queue: a burst of streaming completions, gateway + one node vs direct.

    python -m bench.ttft [--clients 200] [--rounds 3] [--no-write]

A new user's first test of a queue in front of an LLM API: many streaming chat completions sent
at once, each timed to its first content byte. The simulator (its own process) answers each with
10 one-token fragments 20 ms apart after 20 ms. Per round, in turn on the same simulator:

- **direct**: the N requests straight to the simulator.
- **moonq**: the same N requests to ``POST /v1/chat/completions`` on ``moonq gateway`` (its own
  process), served by one ``celery -A worker worker`` node with its defaults.

A load process of its own (aiohttp) sends all N at once and times each from its send to the first
SSE chunk with content (TTFT) and to ``[DONE]`` (end), and checks each answer's text. The figures
are the medians over the rounds of each round's p50 and p99, and the difference moonq - direct.
Every process's CPU over the moonq burst is reported beside them (2 shared cores: a process's CPU is
wall time another one did not get).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.fleets import API_KEY, REPO, clean_env
from bench.perf import Sim, cpu_s
from bench.report import write_section
from harness import RedisServer, WorkerProcess, free_port, wait_for_port

SECTION = "## Time to first token through the queue: a burst through the gateway and one node"
TOKEN = "bench-ttft-token"
FRAGMENTS = 10
GOAL_P50_MS, GOAL_P99_MS = 100.0, 300.0

# The load process: N streaming requests at once; prints one JSON list of [ttft_ms, end_ms, chars].
LOAD = r"""
import asyncio, json, sys, time
import aiohttp
url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Count slowly."}], "stream": True}

async def one(session):
    start = time.monotonic()
    first, text = None, []
    async with session.post(url, json=body, headers={"Authorization": "Bearer " + key}) as r:
        r.raise_for_status()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.monotonic()
                    text.append(piece)
    end = time.monotonic()
    return [(first - start) * 1e3 if first else -1.0, (end - start) * 1e3, len("".join(text))]

async def main():
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print(json.dumps(await asyncio.gather(*(one(session) for _ in range(n)))))

asyncio.run(main())
"""


@dataclass
class Burst:
    ttft_ms: list[float]
    end_ms: list[float]
    chars: int
    cpu_s: dict[str, float] = field(default_factory=dict)

    def pct(self, which: str, q: float) -> float:
        values = sorted(getattr(self, which))
        return values[min(len(values) - 1, int(q * len(values)))]


def burst(url: str, key: str, clients: int, expect_chars: int | None = None) -> Burst:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, url, key, str(clients)], capture_output=True, text=True, timeout=600, check=True
    )
    rows = json.loads(done.stdout)
    chars = statistics.mode(r[2] for r in rows)
    bad = [r for r in rows if r[0] < 0 or r[2] != (expect_chars or chars)]
    if bad:
        raise SystemExit(f"{len(bad)} of {clients} streams came back without the whole answer: {bad[:3]}")
    return Burst([r[0] for r in rows], [r[1] for r in rows], chars)


@dataclass
class Round:
    direct: Burst
    moonq: Burst


def one_round(clients: int) -> Round:
    with RedisServer() as server, Sim(latency_ms=20, chunk_ms=20, answer=(FRAGMENTS, FRAGMENTS), per_chunk=1) as sim:
        assert sim.proc is not None and server.proc is not None
        direct = burst(sim.base_url + "/chat/completions", API_KEY, clients)
        env = clean_env(
            {
                "REDIS_URL": server.url,
                "MOONQ_PREFIX": f"tt{uuid.uuid4().hex[:6]}",
                "MOONSHOT_BASE_URL": sim.base_url,
                "MOONSHOT_API_KEY": API_KEY,
                "MOONQ_METRICS_PORT": "0",
                "MOONQ_GATEWAY_TOKENS": TOKEN,
            }
        )
        port = free_port()
        gateway = subprocess.Popen(
            [str(Path(sys.executable).parent / "moonq"), "gateway", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, timeout_s=30)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            with WorkerProcess(env) as node:
                assert node.proc is not None
                burst(url, TOKEN, clients)  # warm: the pools hold the connections a burst needs, scripts loaded
                time.sleep(1.0)
                pids = {
                    "node": node.proc.pid,
                    "gateway": gateway.pid,
                    "simulator": sim.proc.pid,
                    "redis": server.proc.pid,
                }
                before = {name: cpu_s(pid) for name, pid in pids.items()}
                moonq = burst(url, TOKEN, clients, direct.chars)
                moonq.cpu_s = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    return Round(direct, moonq)


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def section(rounds: list[Round], args: argparse.Namespace) -> str:
    def fig(path: str, which: str, q: float) -> float:
        return med([getattr(r, path).pct(which, q) for r in rounds])

    rows = []
    for which, label in (("ttft_ms", "first content byte"), ("end_ms", "end of the stream")):
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            d, m = fig("direct", which, q), fig("moonq", which, q)
            rows.append(f"| {label} {name} | {d:.0f} ms | {m:.0f} ms | +{m - d:.0f} ms |")
    added50 = fig("moonq", "ttft_ms", 0.5) - fig("direct", "ttft_ms", 0.5)
    added99 = fig("moonq", "ttft_ms", 0.99) - fig("direct", "ttft_ms", 0.99)
    met = "met" if added50 <= GOAL_P50_MS and added99 <= GOAL_P99_MS else "not met"
    cpu = {name: med([r.moonq.cpu_s.get(name, 0.0) for r in rounds]) for name in rounds[0].moonq.cpu_s}
    per_round = "; ".join(
        f"+{r.moonq.pct('ttft_ms', 0.5) - r.direct.pct('ttft_ms', 0.5):.0f} / "
        f"+{r.moonq.pct('ttft_ms', 0.99) - r.direct.pct('ttft_ms', 0.99):.0f}"
        for r in rounds
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"`python -m bench.ttft --clients {args.clients} --rounds {args.rounds}` (`make bench-ttft`). Machine as"
            f" above. {args.clients} streaming chat completions sent at once by a load process of its own (aiohttp);"
            f" the simulator answers each with {FRAGMENTS} one-token fragments 20 ms apart after 20 ms. **direct**:"
            " straight to the simulator; **moonq**: to `moonq gateway` (its own process) in front of one"
            " `celery -A worker worker` node with its defaults. Each request is timed from its send to the first"
            " chunk with content and to `[DONE]`; the figures are the medians over the rounds of each round's"
            f" percentiles. Medians of {args.rounds} rounds, direct and moonq alternating.",
            "",
            "| figure | direct | moonq | added |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Added time to first token per round (p50 / p99, ms): {per_round}. Goal: p50 within"
            f" +{GOAL_P50_MS:.0f} ms and p99 within +{GOAL_P99_MS:.0f} ms of a direct call: {met}.",
            "",
            "CPU over the moonq burst (medians): "
            + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in cpu.items())
            + f"; per job, the node {cpu.get('node', 0.0) / args.clients * 1e3:.1f} ms and the gateway"
            f" {cpu.get('gateway', 0.0) / args.clients * 1e3:.1f} ms.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(args.clients))
        r = rounds[-1]
        print(
            f"round {i + 1}: ttft p50/p99 direct {r.direct.pct('ttft_ms', 0.5):.0f}/{r.direct.pct('ttft_ms', 0.99):.0f}"
            f" ms, moonq {r.moonq.pct('ttft_ms', 0.5):.0f}/{r.moonq.pct('ttft_ms', 0.99):.0f} ms; cpu {r.moonq.cpu_s}",
            flush=True,
        )
    text = section(rounds, args)
    print(text)
    if not args.no_write:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
