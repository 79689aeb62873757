"""The gateway for thousands: 2,000 streaming clients on one gateway process, and vs the LiteLLM proxy.

    python -m bench.gateway_load [--clients 2000] [--compare 200] [--rounds 3] [--no-write]

Every process is started as a user starts it: ``redis-server``, the simulator (``python -m
simulator``), ``celery -A worker worker`` nodes, ``moonq gateway`` (uvicorn) with
``MOONQ_GATEWAY_TOKENS`` and ``REDIS_URL``, and for part B the LiteLLM proxy (``litellm --config``)
from a venv of its own (``.bench/litellm-venv``, created on first use with ``pip install
'litellm[proxy]'``: never a moonq dependency). The load comes from one asyncio aiohttp client in a
process of its own (its CPU is its own): N streaming ``POST /v1/chat/completions`` at once, each
with a prompt of its own, each stream's text checked against the answer the simulator gives that
prompt (computed in-process from ``simulator.answer``). The simulator answers every request with
``--fragments`` one-token fragments ``--chunk-ms`` apart after ``--latency-ms``.

- **Part A** (``--clients``, fresh processes each round): the same N streams straight to the
  simulator, then through the gateway and two nodes (default concurrency 1,000 each), in alternate
  order per round. Sampled every 0.5 s: the gateway's TCP connections to the data Redis (its
  sockets in ``/proc/<pid>/fd`` matched in ``/proc/net/tcp``, cross-checked with ``CLIENT LIST``
  filtered by those source ports), its client sockets, and its RSS (idle after a warm-up vs the
  peak); each process's user + system CPU over each run (``/proc/<pid>/stat``, children included).
- **Part B** (``--compare``, one set of processes for all rounds): direct, through the gateway (+ one
  node), through LiteLLM's proxy in front of the same simulator; the three in turn, rotated per round.

Times per stream, from the request's send: time to the first SSE ``data:`` chunk (TTFB) and to
``data: [DONE]`` (end); p50/p99 per run, medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.fleets import API_KEY, REPO, clean_env, first_chunk_stages, stop_all, wait_for_nodes
from bench.perf import Sim, rss_kib
from bench.report import write_section
from harness import RedisServer, WorkerProcess, free_port, wait_listening
from moonq.broker import producer_app
from moonq.settings import ClientSettings
from simulator import SimConfig
from simulator.answer import answer
from simulator.cache import PrefixCache
from simulator.validate import parse_chat_request

SECTION = "## Gateway for thousands: 2,000 streaming clients, and vs the LiteLLM proxy"
MODEL = "moonshot-v1-8k"
TOKEN = "gw-bench-token"
LITELLM_KEY = "sk-litellm-bench-master"
LITELLM_VENV = REPO / ".bench" / "litellm-venv"
PREFIX = "gwl"
SAMPLE_S = 0.5

# The load: N streams at once from one asyncio aiohttp client, in a process of its own. Prints one JSON line:
# its CPU seconds over the load, the wall time, and per stream [ttfb_s, end_s, text, error, job id, sent (unix s)].
LOADER = r"""
import asyncio, json, sys, time
import aiohttp
base, token, n, model, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
read_timeout = float(sys.argv[6])

async def one(session, i):
    body = {"model": model, "messages": [{"role": "user", "content": prompt.format(i)}], "stream": True}
    t0, sent = time.monotonic(), time.time()
    ttfb, parts, done, err, job = None, [], False, None, None
    try:
        async with session.post(base + "/chat/completions", json=body) as r:
            job = r.headers.get("X-Moonq-Job-Id")
            if r.status != 200:
                return [None, time.monotonic() - t0, "", f"HTTP {r.status}: {(await r.text())[:200]}", job, sent]
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                if ttfb is None:
                    ttfb = time.monotonic() - t0
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    err = str(chunk["error"])[:200]
                    break
                for choice in chunk.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
    except Exception as exc:
        err = repr(exc)[:200]
    if not done and err is None:
        err = "stream ended without [DONE]"
    return [ttfb, time.monotonic() - t0, "".join(parts), err, job, sent]

async def main():
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=read_timeout)
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": "Bearer " + token}
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(one(session, i) for i in range(n)))

cpu0, t0 = time.process_time(), time.monotonic()
results = asyncio.run(main())
print(json.dumps({"cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - t0, "streams": results}))
"""


def prompt_of(tag: str) -> str:
    return f"Client {{}} of {tag}: count slowly."


# ---------------------------------------------------------------- /proc


def cpu_tree_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (LiteLLM may fork; 0 once gone)."""
    total, children = 0.0, _children()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        todo += children.get(p, [])
    return total


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except FileNotFoundError:
        pass
    return out


def tcp_links(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of ``pid``'s established IPv4 TCP connections."""
    inodes = socket_inodes(pid)
    links = []
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED, and the process's own socket
                links.append((int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)))
    return links


@dataclass
class Peak:
    redis_conns: int = 0  # the gateway's connections to the data Redis (/proc)
    redis_clients: int = 0  # the same, as CLIENT LIST sees them (filtered by the gateway's source ports)
    pubsub: int = 0  # of which pub/sub connections
    clients: int = 0  # the gateway's connections on its listening port
    rss_kib: int = 0


class Sampler:
    """Samples the gateway every ``SAMPLE_S`` in a thread; ``peak`` holds the largest figures seen."""

    def __init__(self, pid: int, listen_port: int, redis_port: int, r: redis.Redis) -> None:
        self.pid, self.listen_port, self.redis_port, self.r = pid, listen_port, redis_port, r
        self.peak = Peak()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> Peak:
        links = tcp_links(self.pid)
        to_redis = {local for local, remote in links if remote == self.redis_port}
        seen = [c for c in self.r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in to_redis]
        clients = sum(1 for local, _ in links if local == self.listen_port)
        pubsub = sum(1 for c in seen if int(c.get("sub", 0)) + int(c.get("psub", 0)) > 0)
        return Peak(len(to_redis), len(seen), pubsub, clients, rss_kib(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            now = self.sample()
            for name in ("redis_conns", "redis_clients", "pubsub", "clients", "rss_kib"):
                setattr(self.peak, name, max(getattr(self.peak, name), getattr(now, name)))

    def __enter__(self) -> Sampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ---------------------------------------------------------------- processes


class Gateway:
    """``moonq gateway --host 127.0.0.1 --port P`` as a user starts it."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / "gateway.log"
        self.env = clean_env({"REDIS_URL": redis_url, "MOONQ_PREFIX": PREFIX, "MOONQ_GATEWAY_TOKENS": TOKEN})
        self.cmd = [
            str(Path(sys.executable).parent / "moonq"),
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Gateway:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, 60, lambda: self.log_path.read_text(errors="replace"), "moonq gateway")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_all([self.proc], timeout_s=15)


@contextmanager
def nodes(redis_url: str, base_url: str, count: int, log_dir: Path) -> Iterator[list[int]]:
    """``count`` ``celery -A worker worker`` nodes with their defaults; yields their pids."""
    env = {
        "REDIS_URL": redis_url,
        "MOONQ_PREFIX": PREFIX,
        "MOONSHOT_BASE_URL": base_url,
        "MOONSHOT_API_KEY": API_KEY,
        "MOONQ_METRICS_PORT": "0",
    }
    names = [f"gw{i + 1}-{uuid.uuid4().hex[:4]}@bench" for i in range(count)]
    workers = []
    for name in names:
        worker = WorkerProcess(env, args=("-n", name), log_path=log_dir / f"{name.split('@')[0]}.log")
        worker.env = clean_env(env)
        workers.append(worker)
    try:
        for worker in workers:
            worker.start(wait=False)
        procs = [w.proc for w in workers if w.proc is not None]
        app = producer_app(ClientSettings(redis_url=redis_url, prefix=PREFIX))
        try:
            wait_for_nodes(app, names, procs, [w.log_path for w in workers])
        finally:
            app.close()
        yield [p.pid for p in procs]
    finally:
        stop_all([w.proc for w in workers if w.proc is not None])


def litellm_bin() -> Path:
    """The LiteLLM proxy's command, from its own venv (created with pip on first use)."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"installing litellm[proxy] into {LITELLM_VENV} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "litellm[proxy]"]
        subprocess.run(pip, check=True)
    return exe


class LiteLLM:
    """``litellm --config <file> --port P``: one model whose api_base is the simulator (OpenAI-compatible)."""

    def __init__(self, sim_base_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / "litellm.log"
        self.config = log_dir / "litellm.yaml"
        # The upstream key comes from the environment (os.environ/...), never written to the file.
        self.config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {sim_base_url}\n"
            "      api_key: os.environ/BENCH_UPSTREAM_KEY\n"
            "general_settings:\n"
            "  master_key: os.environ/BENCH_LITELLM_MASTER_KEY\n"
            "litellm_settings:\n"
            "  drop_params: true\n"
        )
        self.env = clean_env(
            {
                "BENCH_UPSTREAM_KEY": API_KEY,
                "BENCH_LITELLM_MASTER_KEY": LITELLM_KEY,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from the internet
                "LITELLM_LOG": "ERROR",
            }
        )
        self.cmd = [str(litellm_bin()), "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> LiteLLM:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, 180, lambda: self.log_path.read_text(errors="replace"), "litellm")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_all([self.proc], timeout_s=15)


# ---------------------------------------------------------------- one load


@dataclass
class Load:
    path: str
    n: int
    ok: int  # streams complete, with [DONE] and exactly the expected text
    errors: list[str]
    ttfb: list[float]
    end: list[float]
    wall_s: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds over the load
    peak: Peak | None = None
    # Through the gateway, per stream from the job's record: send -> enqueued (the gateway's submit),
    # enqueued -> started (queue wait, the node's claim), started -> first chunk out of the gateway.
    stages: dict[str, list[float]] = field(default_factory=dict)

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def expected_texts(cfg: SimConfig, tag: str, n: int) -> list[str]:
    """What the simulator answers each client's prompt (deterministic: seed, model, messages)."""
    prompt = prompt_of(tag)
    out = []
    for i in range(n):
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt.format(i)}], "stream": True}
        out.append(answer(cfg, PrefixCache(0), parse_chat_request(body)).outcomes[0].content)
    return out


def run_load(
    path: str,
    base_url: str,
    token: str,
    expected: list[str],
    tag: str,
    pids: dict[str, int],
    sampler: Sampler | None,
    r: redis.Redis | None = None,
    read_timeout_s: float = 300.0,
) -> Load:
    before = {name: cpu_tree_s(pid) for name, pid in pids.items()}
    cmd = [
        sys.executable,
        "-c",
        LOADER,
        base_url,
        token,
        str(len(expected)),
        MODEL,
        prompt_of(tag),
        str(read_timeout_s),
    ]
    with ExitStack() as stack:
        if sampler is not None:
            stack.enter_context(sampler)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    cpu = {name: cpu_tree_s(pid) - before[name] for name, pid in pids.items()}
    if done.returncode != 0:
        raise RuntimeError(f"the load client failed ({done.returncode}): {done.stderr[-2000:]}")
    out = json.loads(done.stdout.splitlines()[-1])
    cpu["load client"] = float(out["cpu_s"])
    errors, ttfb, end, ok = [], [], [], 0
    for i, (first, last, text, err, _, _) in enumerate(out["streams"]):
        if err is None and text != expected[i]:
            err = f"stream {i}: text differs from the expected answer ({len(text)} vs {len(expected[i])} chars)"
        if err is None:
            ok += 1
            ttfb.append(float(first))
            end.append(float(last))
        else:
            errors.append(str(err))
    peak = sampler.peak if sampler else None
    load = Load(path, len(expected), ok, errors, ttfb, end, float(out["wall_s"]), cpu, peak)
    if r is not None:
        # Stream rows: (ttfb s, ..., job id, sent at); the gateway's streams only (with a job id).
        timed = [(s[4], s[5], s[0]) for s in out["streams"] if s[4] and s[0] is not None]
        load.stages = first_chunk_stages(r, PREFIX, timed)
    return load


def show(load: Load) -> str:
    line = (
        f"{load.path}: {load.ok}/{load.n} ok, TTFB p50 {load.pct(load.ttfb, 0.5) * 1000:.0f} ms"
        f" p99 {load.pct(load.ttfb, 0.99) * 1000:.0f} ms, end p50 {load.pct(load.end, 0.5) * 1000:.0f} ms"
        f" p99 {load.pct(load.end, 0.99) * 1000:.0f} ms, wall {load.wall_s:.1f} s; CPU s "
        + ", ".join(f"{k} {v:.1f}" for k, v in load.cpu.items())
    )
    if load.peak is not None:
        p = load.peak
        line += (
            f"; gateway peak: {p.redis_conns} Redis conns ({p.redis_clients} in CLIENT LIST, {p.pubsub} pub/sub),"
            f" {p.clients} client sockets, RSS {p.rss_kib / 1024:.0f} MiB"
        )
    for stage, values in load.stages.items():
        line += f"; {stage} p50 {load.pct(values, 0.5) * 1000:.0f} ms p99 {load.pct(values, 0.99) * 1000:.0f} ms"
    if load.errors:
        line += f"; first errors: {load.errors[:3]}"
    return line


# ---------------------------------------------------------------- the parts


@dataclass
class Pacing:
    latency_ms: float
    chunk_ms: float
    fragments: int

    def sim(self) -> Sim:
        return Sim(
            latency_ms=self.latency_ms, chunk_ms=self.chunk_ms, answer=(self.fragments, self.fragments), per_chunk=1
        )

    def config(self) -> SimConfig:
        return SimConfig(answer_tokens=(self.fragments, self.fragments), tokens_per_chunk=1)


@dataclass
class RoundA:
    direct: Load
    gateway: Load
    idle_rss_kib: int
    idle: Peak


def warm(base_url: str, token: str, cfg: SimConfig) -> None:
    """One stream through ``base_url``, checked: connections opened, code paths run once."""
    load = run_load("warm-up", base_url, token, expected_texts(cfg, "warm", 1), "warm", {}, None, read_timeout_s=60)
    if load.ok != 1:
        raise RuntimeError(f"warm-up through {base_url} failed: {load.errors}")


def part_a(n: int, node_count: int, pacing: Pacing, round_no: int, log_dir: Path) -> RoundA:
    cfg = pacing.config()
    expected = expected_texts(cfg, f"A{round_no}", n)
    with (
        RedisServer() as server,
        pacing.sim() as sim,
        nodes(server.url, sim.base_url, node_count, log_dir) as node_pids,
        Gateway(server.url, log_dir) as gw,
    ):
        assert sim.proc is not None and server.proc is not None
        r = redis.Redis.from_url(server.url)
        warm(gw.base_url, TOKEN, cfg)
        warm(sim.base_url, API_KEY, cfg)
        time.sleep(2.0)
        sampler = Sampler(gw.pid, gw.port, server.port, r)
        idle = sampler.sample()
        pids = {"gateway": gw.pid, "simulator": sim.proc.pid, "redis": server.proc.pid}
        pids |= {f"node {i + 1}": pid for i, pid in enumerate(node_pids)}
        loads = {}
        order = ["direct", "gateway"] if round_no % 2 else ["gateway", "direct"]
        for path in order:
            if path == "direct":
                loads[path] = run_load(path, sim.base_url, API_KEY, expected, f"A{round_no}", pids, None)
            else:
                loads[path] = run_load(path, gw.base_url, TOKEN, expected, f"A{round_no}", pids, sampler, r)
            print(f"  A round {round_no} {show(loads[path])}", flush=True)
            time.sleep(2.0)
        r.close()
    return RoundA(loads["direct"], loads["gateway"], idle.rss_kib, idle)


def part_b(n: int, rounds: int, pacing: Pacing, log_dir: Path) -> list[dict[str, Load]]:
    cfg = pacing.config()
    out: list[dict[str, Load]] = []
    with (
        RedisServer() as server,
        pacing.sim() as sim,
        nodes(server.url, sim.base_url, 1, log_dir) as node_pids,
        Gateway(server.url, log_dir) as gw,
        LiteLLM(sim.base_url, log_dir) as proxy,
    ):
        assert sim.proc is not None and server.proc is not None
        paths = {
            "direct": (sim.base_url, API_KEY),
            "moonq gateway": (gw.base_url, TOKEN),
            "LiteLLM proxy": (proxy.base_url, LITELLM_KEY),
        }
        r = redis.Redis.from_url(server.url)
        for base, token in paths.values():
            warm(base, token, cfg)
        time.sleep(2.0)
        pids = {
            "gateway": gw.pid,
            "node": node_pids[0],
            "LiteLLM": proxy.pid,
            "simulator": sim.proc.pid,
            "redis": server.proc.pid,
        }
        names = list(paths)
        for k in range(rounds):
            tag = f"B{k + 1}"
            expected = expected_texts(cfg, tag, n)
            loads = {}
            for path in names[k % 3 :] + names[: k % 3]:
                base, token = paths[path]
                loads[path] = run_load(path, base, token, expected, tag, pids, None, r if base == gw.base_url else None)
                print(f"  B round {k + 1} {show(loads[path])}", flush=True)
                time.sleep(2.0)
            out.append(loads)
        r.close()
    return out


# ---------------------------------------------------------------- report


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def ms(v: float) -> str:
    return f"{v * 1000:,.0f} ms"


def latency_cells(loads: list[Load], base: list[Load] | None) -> list[str]:
    cells = []
    for attr in ("ttfb", "end"):
        for q in (0.5, 0.99):
            v = med([ld.pct(getattr(ld, attr), q) for ld in loads])
            cell = ms(v)
            if base is not None:
                added = v - med([ld.pct(getattr(ld, attr), q) for ld in base])
                cell += f" (+{ms(added)})" if added >= 0 else f" (-{ms(-added)})"
            cells.append(cell)
    return cells


def stage_cells(loads: list[Load], latency_ms: float) -> str:
    what = {
        "submit": "request sent -> job enqueued by the gateway",
        "queued": "enqueued -> started by a node",
        "relay": f"started -> first chunk out of the gateway (the simulator's {latency_ms:.0f} ms included)",
    }
    parts = []
    for stage, label in what.items():
        p50 = med([ld.pct(ld.stages.get(stage, []), 0.5) for ld in loads])
        p99 = med([ld.pct(ld.stages.get(stage, []), 0.99) for ld in loads])
        parts.append(f"{label} {ms(p50)} / {ms(p99)}")
    return "; ".join(parts)


def largest_stage(loads: list[Load]) -> str:
    names = {"submit": "the gateway's submit", "queued": "waiting for a node to start the job", "relay": "the relay"}
    p50 = {stage: med([ld.pct(ld.stages.get(stage, []), 0.5) for ld in loads]) for stage in names}
    stage = max(p50, key=lambda k: p50[k])
    return f"{names[stage]} ({ms(p50[stage])})"


def cpu_cells(loads: list[Load], names: list[str]) -> str:
    parts = []
    for name in names:
        secs = med([ld.cpu.get(name, 0.0) for ld in loads])
        pct = med([ld.cpu.get(name, 0.0) / ld.wall_s * 100 for ld in loads])
        parts.append(f"{name} {secs:.1f} s ({pct:.0f}%)")
    return ", ".join(parts)


def section(a: list[RoundA], b: list[dict[str, Load]], args: argparse.Namespace, load_note: str) -> str:
    lines = [
        SECTION,
        "",
        f"`python -m bench.gateway_load --clients {args.clients} --compare {args.compare} --rounds {args.rounds}"
        f" --nodes {args.nodes}` (Makefile target `bench-gateway`). Machine as above (2 shared cores; {load_note})."
        f" The simulator (its own process) answers each request with {args.fragments} one-token fragments"
        f" {args.chunk_ms:.0f} ms apart after {args.latency_ms:.0f} ms. The load comes from one asyncio aiohttp"
        " client in a process of its own, every stream sent at once, each with its own prompt, each stream's text"
        " checked against the simulator's answer to that prompt. `moonq gateway` runs as a user starts it (one"
        " uvicorn process, its defaults); nodes are `celery -A worker worker` with their defaults. TTFB: from the"
        " request's send to the first SSE `data:` chunk; end: to `data: [DONE]`. p50/p99 per run, medians of"
        f" {args.rounds} rounds. CPU: user + system seconds of each process over the run (and as % of one core over"
        " the run's wall time); all processes share the 2 cores, so the figures under load include queueing for CPU.",
        "",
    ]
    if a:
        lines += part_a_lines(a, args)
    if b:
        lines += part_b_lines(b, args)
    return "\n".join(lines)


def part_a_lines(a: list[RoundA], args: argparse.Namespace) -> list[str]:
    gw, direct = [r.gateway for r in a], [r.direct for r in a]
    peaks = [r.gateway.peak or Peak() for r in a]
    idle_rss = med([r.idle_rss_kib for r in a])
    peak_rss = med([p.rss_kib for p in peaks])
    per_client = med([((p.rss_kib - r.idle_rss_kib) / args.clients) for p, r in zip(peaks, a, strict=True)])
    node_names = [f"node {i + 1}" for i in range(args.nodes)]
    per_stream = med([ld.cpu["gateway"] / args.clients for ld in gw])
    chunks = args.fragments + 2  # the role chunk, the fragments, the finish chunk
    lines = [
        f"**Part A: {args.clients:,} streams at once through one gateway process** ({args.nodes} node(s), fresh"
        " processes each round, direct and gateway in alternate order).",
        "",
        "| path | complete, exact text | TTFB p50 | TTFB p99 | end p50 | end p99 | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, loads, base in (("direct to the simulator", direct, None), ("through the gateway", gw, direct)):
        ok = " / ".join(f"{ld.ok:,}" for ld in loads)
        cells = latency_cells(loads, base)
        lines.append(
            f"| {name} | {ok} of {args.clients:,} | "
            + " | ".join(cells)
            + f" | {med([ld.wall_s for ld in loads]):.1f} s |"
        )
    lines += [
        "",
        "Through the gateway, the gateway process at the peak (sampled every 0.5 s; per round):"
        f" Redis connections {' / '.join(str(p.redis_conns) for p in peaks)} (idle before the load:"
        f" {' / '.join(str(r.idle.redis_conns) for r in a)}; CLIENT LIST filtered by the gateway's source ports:"
        f" {' / '.join(str(p.redis_clients) for p in peaks)}, of which pub/sub"
        f" {' / '.join(str(p.pubsub) for p in peaks)});"
        f" client sockets {' / '.join(f'{p.clients:,}' for p in peaks)}; RSS idle {idle_rss / 1024:.0f} MiB, peak"
        f" {peak_rss / 1024:.0f} MiB: **{per_client:.0f} KiB per streaming client** (median of rounds).",
        "",
        "Where a gateway stream's time to first chunk went (from its job's record; p50 / p99, median of rounds): "
        + stage_cells(gw, args.latency_ms)
        + f". The largest share of the gateway's TTFB p50: {largest_stage(gw)}; the gateway process itself used"
        f" {med([ld.cpu['gateway'] / ld.wall_s for ld in gw]) * 100:.0f}% of one core over the run.",
        "",
        "CPU over each run (median of rounds): direct: "
        + cpu_cells(direct, ["simulator", "load client"])
        + f"; all processes {med([sum(ld.cpu.values()) for ld in direct]):.1f} s.",
        "Through the gateway: "
        + cpu_cells(gw, ["gateway", *node_names, "simulator", "redis", "load client"])
        + f"; all processes {med([sum(ld.cpu.values()) for ld in gw]):.1f} s. The gateway's CPU per stream:"
        f" {per_stream * 1000:.1f} ms ({chunks} chunks each: {per_stream / chunks * 1e6:.0f} us per chunk, the"
        " submit included).",
        "",
    ]
    failures = [e for ld in gw + direct for e in ld.errors]
    if failures:
        lines += [f"Failed streams: {len(failures)}; first: {failures[:3]}", ""]
    return lines


def part_b_lines(b: list[dict[str, Load]], args: argparse.Namespace) -> list[str]:
    direct = [r["direct"] for r in b]
    lines = [
        f"**Part B: {args.compare} streams at once, three paths to the same simulator** (one set of processes, the"
        " paths in turn, rotated each round): direct; `moonq gateway` + one node; the LiteLLM proxy"
        " (`litellm --config`, pip `litellm[proxy]` in its own venv, its defaults: one process; one model"
        " `openai/moonshot-v1-8k` whose `api_base` is the simulator).",
        "",
        "| path | complete, exact text | TTFB p50 (added) | TTFB p99 (added) | end p50 (added) | end p99 (added) |",
        "|---|---|---|---|---|---|",
    ]
    for path in ("direct", "moonq gateway", "LiteLLM proxy"):
        loads = [r[path] for r in b]
        ok = " / ".join(f"{ld.ok}" for ld in loads)
        cells = latency_cells(loads, None if path == "direct" else direct)
        lines.append(f"| {path} | {ok} of {args.compare} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "CPU over each path's run (median of rounds): direct: "
        + cpu_cells([r["direct"] for r in b], ["simulator", "load client"])
        + "; moonq gateway: "
        + cpu_cells([r["moonq gateway"] for r in b], ["gateway", "node", "simulator", "redis", "load client"])
        + "; LiteLLM proxy: "
        + cpu_cells([r["LiteLLM proxy"] for r in b], ["LiteLLM", "simulator", "load client"])
        + ". All processes, per path: "
        + ", ".join(f"{path} {med([sum(r[path].cpu.values()) for r in b]):.1f} s" for path in b[0])
        + ".",
        "",
        "Through the gateway, where a stream's time to first chunk went (p50 / p99, median of rounds): "
        + stage_cells([r["moonq gateway"] for r in b], args.latency_ms)
        + ".",
        "",
    ]
    return lines


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} (1 / 5 min) when the run ended"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000, help="part A: streams at once through one gateway")
    parser.add_argument("--compare", type=int, default=200, help="part B: streams at once per path (0: skip)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2, help="part A: nodes (concurrency 1,000 each by default)")
    parser.add_argument("--fragments", type=int, default=15)
    parser.add_argument("--chunk-ms", type=float, default=40.0)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--skip-a", action="store_true", help="part B only")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    pacing = Pacing(args.latency_ms, args.chunk_ms, args.fragments)
    log_dir = Path(tempfile.mkdtemp(prefix="moonq-gwload-"))
    print(f"logs in {log_dir}", flush=True)
    a: list[RoundA] = []
    if not args.skip_a and args.clients > 0:
        for k in range(args.rounds):
            a.append(part_a(args.clients, args.nodes, pacing, k + 1, log_dir))
    b = part_b(args.compare, args.rounds, pacing, log_dir) if args.compare > 0 else []
    text = section(a, b, args, machine_load())
    print(text)
    if not args.no_write:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
