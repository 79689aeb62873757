"""Time to the first token through the queue: a burst of streaming completions, gateway + one node vs direct.

    python -m bench.ttft [--clients 200] [--rounds 3] [--baseline REV] [--two-nodes] [--no-write]

A new user's first test of a queue in front of an LLM API: many streaming chat completions sent
at once, each timed to its first content byte. The simulator (its own process) answers each with
10 one-token fragments 20 ms apart after 20 ms. Per round, in turn on the same simulator:

- **direct**: the N requests straight to the simulator.
- **moonq**: the same N requests to ``POST /v1/chat/completions`` on ``moonq gateway`` (its own
  process), served by one ``celery -A worker worker`` node with its defaults.
- with ``--baseline REV``: the same through REV's gateway and node; with ``--two-nodes``: through this
  checkout's gateway and two nodes (two processes on the same cores: does a second GIL help?).

A load process of its own (aiohttp) sends all N at once and times each from its send to the first
SSE chunk with content (TTFT) and to ``[DONE]`` (end), and checks each answer's text. The figures
are the medians over the rounds of each round's p50 and p99, and the difference moonq - direct.
Every process's CPU over the moonq burst is reported beside them (2 shared cores: a process's CPU is
wall time another one did not get).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.fleets import API_KEY, REPO, first_chunk_stages, node_env, source_tree
from bench.perf import Sim, cpu_s
from bench.report import machine_line, write_section
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
    sent, start = time.time(), time.monotonic()
    first, text = None, []
    async with session.post(url, json=body, headers={"Authorization": "Bearer " + key}) as r:
        r.raise_for_status()
        job = r.headers.get("X-Moonq-Job-Id")
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
    return [(first - start) * 1e3 if first else -1.0, (end - start) * 1e3, len("".join(text)), sent, job]

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
    sent: list[float] = field(default_factory=list)  # each request's send, unix s
    jobs: list[str | None] = field(default_factory=list)  # its job id (through moonq)
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Through moonq, from each job's record: stage -> ms per request (STAGES).
    stages: dict[str, list[float]] = field(default_factory=dict)

    def pct(self, which: str, q: float) -> float:
        return self.quantile(getattr(self, which), q)

    @staticmethod
    def quantile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def burst(url: str, key: str, clients: int, expect_chars: int | None = None) -> Burst:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, url, key, str(clients)], capture_output=True, text=True, timeout=600, check=True
    )
    rows = json.loads(done.stdout)
    chars = statistics.mode(r[2] for r in rows)
    bad = [r for r in rows if r[0] < 0 or r[2] != (expect_chars or chars)]
    if bad:
        raise SystemExit(f"{len(bad)} of {clients} streams came back without the whole answer: {bad[:3]}")
    return Burst([r[0] for r in rows], [r[1] for r in rows], chars, [r[3] for r in rows], [r[4] for r in rows])


# Where a request's time to its first content byte went through moonq, from its job's record.
STAGES = {
    "submit": "request sent -> job enqueued by the gateway",
    "queued": "enqueued -> started by the node (its claim)",
    "relay": "started -> first content byte at the client (the simulator's 20 ms and its role-only chunk first)",
}


def stages(redis_url: str, prefix: str, b: Burst) -> dict[str, list[float]]:
    """Each request's time to its first content split at its job's record (``first_chunk_stages``), in ms."""
    timed = [(job, sent, ttft / 1e3) for job, sent, ttft in zip(b.jobs, b.sent, b.ttft_ms, strict=True) if job]
    with redis.Redis.from_url(redis_url) as r:
        return {stage: [x * 1e3 for x in xs] for stage, xs in first_chunk_stages(r, prefix, timed).items()}


@dataclass
class Round:
    direct: Burst
    moonq: dict[str, Burst]  # "now"; "before" with --baseline; "two" (two nodes) with --two-nodes


def through_moonq(server: RedisServer, sim: Sim, tree: Path, clients: int, chars: int, nodes: int = 1) -> Burst:
    """A burst through a gateway and ``nodes`` nodes started from ``tree`` (this checkout, or a baseline's);
    the nodes' CPU is summed as ``node``."""
    assert sim.proc is not None and server.proc is not None
    prefix = f"tt{uuid.uuid4().hex[:6]}"
    env = node_env(server.url, sim.base_url, prefix, tree, MOONQ_GATEWAY_TOKENS=TOKEN)
    port = free_port()
    gateway = subprocess.Popen(
        [str(Path(sys.executable).parent / "moonq"), "gateway", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout_s=30)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with contextlib.ExitStack() as stack:
            workers = [
                stack.enter_context(WorkerProcess(env, cwd=tree, args=("-n", f"ttft{i}@bench"))) for i in range(nodes)
            ]
            burst(url, TOKEN, clients)  # warm: the pools hold the connections a burst needs, scripts loaded
            time.sleep(1.0)
            procs = {"node": [w.proc.pid for w in workers if w.proc is not None]}
            procs |= {"gateway": [gateway.pid], "simulator": [sim.proc.pid], "redis": [server.proc.pid]}
            before = {name: sum(cpu_s(pid) for pid in pids) for name, pids in procs.items()}
            result = burst(url, TOKEN, clients, chars)
            result.cpu_s = {name: sum(cpu_s(pid) for pid in pids) - before[name] for name, pids in procs.items()}
            result.stages = stages(server.url, prefix, result)
            return result
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


def one_round(clients: int, trees: dict[str, tuple[Path, int]]) -> Round:
    """``trees``: each path's code tree and its number of nodes."""
    with RedisServer() as server, Sim(latency_ms=20, chunk_ms=20, answer=(FRAGMENTS, FRAGMENTS), per_chunk=1) as sim:
        direct = burst(sim.base_url + "/chat/completions", API_KEY, clients)
        moonq = {
            name: through_moonq(server, sim, tree, clients, direct.chars, nodes)
            for name, (tree, nodes) in trees.items()
        }
        return Round(direct, moonq)


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def section(rounds: list[Round], args: argparse.Namespace) -> str:
    names = list(rounds[0].moonq)
    label = {"before": f"moonq before (`{args.baseline}`)", "now": "moonq now", "two": "moonq now, two nodes"}

    def fig(name: str | None, which: str, q: float) -> float:
        return med([(r.direct if name is None else r.moonq[name]).pct(which, q) for r in rounds])

    rows = []
    for which, what in (("ttft_ms", "first content byte"), ("end_ms", "end of the stream")):
        for q, pname in ((0.5, "p50"), (0.99, "p99")):
            d = fig(None, which, q)
            cells = [f"{fig(n, which, q):.0f} ms (+{fig(n, which, q) - d:.0f})" for n in names]
            rows.append(f"| {what} {pname} | {d:.0f} ms | " + " | ".join(cells) + " |")
    added50 = fig("now", "ttft_ms", 0.5) - fig(None, "ttft_ms", 0.5)
    added99 = fig("now", "ttft_ms", 0.99) - fig(None, "ttft_ms", 0.99)
    met = "met" if added50 <= GOAL_P50_MS and added99 <= GOAL_P99_MS else "not met"

    def added(r: Round, name: str) -> str:
        b, d = r.moonq[name], r.direct
        p50, p99 = (b.pct("ttft_ms", q) - d.pct("ttft_ms", q) for q in (0.5, 0.99))
        return f"+{p50:.0f} / +{p99:.0f}"

    stage_lines = []
    for n in names:
        cells = []
        for stage, what in STAGES.items():
            values = [r.moonq[n].stages.get(stage) or [] for r in rounds]
            if all(values):
                p50, p99 = (med([Burst.quantile(v, q) for v in values]) for q in (0.5, 0.99))
                cells.append(f"{what} {p50:.0f} / {p99:.0f} ms")
        if cells:
            stage_lines.append(f"- {label[n]}: " + "; ".join(cells) + ".")
    cpu_lines = []
    for n in names:
        cpu = {proc: med([r.moonq[n].cpu_s.get(proc, 0.0) for r in rounds]) for proc in rounds[0].moonq[n].cpu_s}
        cpu_lines.append(
            f"- {label[n]}: "
            + ", ".join(f"{proc} {seconds:.2f} s" for proc, seconds in cpu.items())
            + f"; per job, {'the two nodes' if n == 'two' else 'the node'}"
            f" {cpu.get('node', 0.0) / args.clients * 1e3:.2f} ms and the gateway"
            f" {cpu.get('gateway', 0.0) / args.clients * 1e3:.2f} ms."
        )
    command = (
        f"python -m bench.ttft --clients {args.clients} --rounds {args.rounds}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + (" --two-nodes" if args.two_nodes else "")
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"`{command}` (`make bench-ttft`), {time.strftime('%Y-%m-%d')}; machine: {machine_line()}."
            f" {args.clients} streaming chat completions sent at"
            " once by a load process of its own (aiohttp); the simulator answers each with"
            f" {FRAGMENTS} one-token fragments 20 ms apart after 20 ms. **direct**: straight to the simulator;"
            " **moonq**: to `moonq gateway` (its own process) in front of one `celery -A worker worker` node with"
            " its defaults, after a first burst of the same size (connection pools grown, scripts loaded)."
            + (
                f" **before**: the gateway and node of `{args.baseline}` (its files, this environment), in the same"
                " rounds."
                if args.baseline
                else ""
            )
            + (
                " **two nodes**: this checkout's gateway in front of two nodes (two processes, so two GILs) on the"
                " same 2 cores, in the same rounds: not the goal's setup (one node), but what a user can do."
                if args.two_nodes
                else ""
            )
            + " Each request is timed from its send to the first chunk with content and to `[DONE]`; a figure is"
            f" the median over {args.rounds} rounds of each round's percentile (in brackets: added to direct).",
            "",
            "| figure | direct | " + " | ".join(label[n] for n in names) + " |",
            "|---|---|" + "---|" * len(names),
            *rows,
            "",
            "Added time to first token per round (p50 / p99, ms): "
            + "; ".join(", ".join(f"{n} {added(r, n)}" for n in names) for r in rounds)
            + f". Goal: p50 within +{GOAL_P50_MS:.0f} ms and p99 within +{GOAL_P99_MS:.0f} ms of a direct call:"
            f" {met}.",
            "",
            *(
                [
                    "Where the time to first content went through moonq, from each job's record (`enqueued_at`,"
                    " `started_at`; p50 / p99, median of rounds):",
                    "",
                    *stage_lines,
                    "",
                ]
                if stage_lines
                else []
            ),
            "CPU over the burst through moonq (medians; 2 cores shared by all of them and the load process):",
            "",
            *cpu_lines,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a git revision whose gateway and node to measure beside this checkout's")
    parser.add_argument("--two-nodes", action="store_true", help="also this checkout's gateway with two nodes")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    rounds = []
    with source_tree(args.baseline) as base:
        trees = {"before": (base, 1), "now": (REPO, 1)} if args.baseline else {"now": (REPO, 1)}
        if args.two_nodes:
            trees["two"] = (REPO, 2)
        for i in range(args.rounds):
            rounds.append(one_round(args.clients, trees))
            r = rounds[-1]
            print(
                f"round {i + 1}: ttft p50/p99 direct {r.direct.pct('ttft_ms', 0.5):.0f}/"
                f"{r.direct.pct('ttft_ms', 0.99):.0f} ms; "
                + "; ".join(
                    f"{n} {b.pct('ttft_ms', 0.5):.0f}/{b.pct('ttft_ms', 0.99):.0f} ms (node {b.cpu_s['node']:.2f} s,"
                    f" gateway {b.cpu_s['gateway']:.2f} s)"
                    for n, b in r.moonq.items()
                ),
                flush=True,
            )
    text = section(rounds, args)
    print(text)
    if not args.no_write:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
