"""The processes a nemesis run drives, and the faults each of them takes.

A private redis-server with AOF (so a restart keeps queued work), RabbitMQ in that variant, the
simulator behind its tap, and ``nodes`` real ``celery -A worker worker`` processes. Every node
reaches Redis (and the AMQP broker) through a ``TcpProxy`` of its own, so a cut or a blackhole
hits that node's links only; producers, followers and the checker talk to the servers directly.

Liveness settings are the suite's ``FAST`` ones (3 s visibility timeout, 0.5 s heartbeats, 3 s
leases), so every recovery plays out in seconds.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import RabbitMQServer, RedisServer, TcpProxy, WorkerProcess
from moonq.settings import ClientSettings
from simulator import SimConfig
from tests.helpers import API_KEY, FAST
from tests.nemesis.tap import TappedSimulator, tapped_simulator

VISIBILITY_TIMEOUT_S = float(FAST["visibility_timeout_s"])
# The simulator admits this many calls above the fleet's limit before it refuses one (429): a node
# releases its lease once it has read [DONE], which can be a moment before the simulator's books close
# the call. More than this over the limit at once means leases were lost.
SIM_LIMIT_SLACK = 2
# Celery logs this line for every message a node takes (kombu logs nothing per delivery).
RECEIVED = re.compile(rb"Task moonq\.run_job\[([0-9a-f-]{36})\] received")
# worker/job.py logs this for a delivery that found its job already ended.
SKIPPED = re.compile(rb"event=delivery_skipped job_id=([0-9a-f-]{36}) status=(\w+)")


def libfaketime() -> str | None:
    """The libfaketime preload library (Debian: ``apt-get install faketime``), or None."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def skew_env(offset: str) -> dict[str, str]:
    """Environment that offsets a process's clocks by ``offset`` (``"+15s"``).

    The wall clock is what matters (a host whose NTP is off has a wrong ``time.time()``). The monotonic
    clock moves by the same constant, which nothing can tell from a sound one: leaving it alone
    (FAKETIME_DONT_FAKE_MONOTONIC) makes libfaketime 0.9.10 fail every ``time.sleep`` with EINVAL under a
    negative offset, which killed nodes in chaos seed 4 for a reason no real host has.
    """
    lib = libfaketime()
    if lib is None:
        raise RuntimeError("libfaketime is not installed (Debian/Ubuntu: apt-get install faketime)")
    return {"LD_PRELOAD": lib, "FAKETIME": offset, "FAKETIME_FORCE_MONOTONIC_FIX": "1"}


@dataclass
class ClusterConfig:
    broker: str = "redis"  # or "rabbitmq"
    nodes: int = 3
    seed: int = 0
    max_inflight: int = 8  # MOONQ_MAX_INFLIGHT, and the simulator's own concurrency limit
    fault_rate: float = 0.08  # random upstream faults per request
    node_concurrency: int = 64


@dataclass
class Node:
    """One node slot: its proxies, and the processes it has had (one per start)."""

    name: str
    redis_proxy: TcpProxy
    amqp_proxy: TcpProxy | None
    env: dict[str, str]
    proc: WorkerProcess | None = None
    state: str = "down"  # up | paused | stopping | down
    skew: str | None = None
    generation: int = 0
    logs: list[Path] = field(default_factory=list)
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.proc.pid if self.proc is not None and self.proc.proc is not None else None

    def signal(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def log_size(self) -> int:
        return self.logs[-1].stat().st_size if self.logs and self.logs[-1].exists() else 0


class Cluster:
    """Start with ``start()`` (or ``with``); every fault method returns at once or within seconds."""

    def __init__(self, cfg: ClusterConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"nm{self.tag}"
        self.queue = f"nmq{self.tag}"
        self.redis = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "everysec"))
        self.rabbit = RabbitMQServer() if cfg.broker == "rabbitmq" else None
        self.sim_cfg = SimConfig(
            seed=cfg.seed,
            first_token_latency_s=0.05,
            chunk_interval_s=0.06,
            answer_tokens=(30, 90),
            fault_rate=cfg.fault_rate,
            # Transient faults only (a retry fixes each); stall is below the nodes' 10 s read timeout.
            fault_kinds=(
                "overload",
                "rate_limit",
                "server_error",
                "unavailable",
                "drop",
                "truncate",
                "corrupt",
                "stall:1",
            ),
            max_concurrency=cfg.max_inflight + SIM_LIMIT_SLACK,
        )
        self.sim: TappedSimulator | None = None
        self.nodes: list[Node] = []
        self.redis_state = "down"  # up | paused | down
        self._stack = contextlib.ExitStack()
        self._lock = threading.RLock()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.redis.start()
            self.redis_state = "up"
            if self.rabbit is not None:
                self.rabbit.start()
            self.sim = self._stack.enter_context(tapped_simulator(self.sim_cfg))
            self.nodes = [self._make_node(i) for i in range(self.cfg.nodes)]
            for node in self.nodes:
                self.start_node(node, wait=False)
            for node in self.nodes:
                assert node.proc is not None
                node.proc.wait_ready(timeout_s=90)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def settings(self) -> ClientSettings:
        """What producers, followers and the checker use: the servers directly, not through a proxy."""
        broker = self.rabbit.url if self.rabbit is not None else self.redis.url
        return ClientSettings(redis_url=self.redis.url, broker_url=broker, prefix=self.prefix, queue=self.queue)

    def _make_node(self, i: int) -> Node:
        assert self.sim is not None
        redis_proxy = TcpProxy(self.redis.port).start()
        self._stack.callback(redis_proxy.stop)
        redis_url = f"redis://{redis_proxy.url_host}/0"
        broker_url, amqp_proxy = redis_url, None
        if self.rabbit is not None:
            amqp_proxy = TcpProxy(self.rabbit.port).start()
            self._stack.callback(amqp_proxy.stop)
            broker_url = f"amqp://guest:guest@{amqp_proxy.url_host}//"
        env = {
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": broker_url,
            "MOONQ_PREFIX": self.prefix,
            "MOONQ_QUEUE": self.queue,
            "MOONSHOT_BASE_URL": self.sim.base_url,
            "MOONSHOT_API_KEY": API_KEY,
            **{f"MOONQ_{k.upper()}": str(v) for k, v in FAST.items()},
            "MOONQ_MAX_INFLIGHT": str(self.cfg.max_inflight),
            "MOONQ_CONCURRENCY": str(self.cfg.node_concurrency),
            # The sweeper on the run's time scale: a job silent for 8 s (over twice the 3 s visibility
            # timeout) is looked at, once a second.
            "MOONQ_SWEEP_INTERVAL_S": "1.0",
            "MOONQ_ORPHAN_AFTER_S": "8.0",
        }
        return Node(f"node{i}", redis_proxy, amqp_proxy, env)

    def start_node(self, node: Node, *, skew: str | None = None, wait: bool = False) -> None:
        """A new process in ``node``'s slot (the last one must be gone), its wall clock offset by ``skew``."""
        with self._lock:
            node.generation += 1
            node.skew = skew
            log = self.workdir / f"{node.name}-g{node.generation}.log"
            node.logs.append(log)
            env = {**node.env, **(skew_env(skew) if skew else {})}
            args = ("-n", f"{node.name}-g{node.generation}-{self.tag}@%h")
            node.proc = WorkerProcess(env, args=args, log_path=log).start(wait=False)
            node.state = "up"
        if wait:
            node.proc.wait_ready(timeout_s=90)

    def check_nodes(self) -> None:
        """Notice nodes that exited without being told to (a crash), record why, start them again."""
        with self._lock:
            for node in self.nodes:
                proc = node.proc.proc if node.proc is not None else None
                if node.state in ("up", "paused") and proc is not None and proc.poll() is not None:
                    tail = node.logs[-1].read_text(errors="replace")[-3000:] if node.logs else ""
                    exit_info = {"node": node.name, "generation": node.generation, "code": proc.returncode}
                    node.unexpected_exits.append({**exit_info, "t": time.time(), "log_tail": tail})
                    node.state = "down"
                    self.start_node(node, skew=node.skew)

    def stop(self) -> None:
        """Stop every process this cluster started (paused ones are continued first)."""
        for node in self.nodes:
            if node.state == "paused":
                node.signal(signal.SIGCONT)
            if node.proc is not None:
                node.proc.stop(timeout_s=15)
            node.state = "down"
        if self.redis.proc is not None and self.redis_state == "paused":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.redis.proc.pid, signal.SIGCONT)
        self._stack.close()
        if self.rabbit is not None:
            self.rabbit.stop()
        self.redis.stop()
        self.redis_state = "down"

    # --- node faults --------------------------------------------------------------------------

    def up_nodes(self) -> list[Node]:
        with self._lock:
            return [n for n in self.nodes if n.state == "up"]

    def kill(self, node: Node) -> None:
        with self._lock:
            node.state = "down"
            node.signal(signal.SIGKILL)

    def terminate(self, node: Node) -> None:
        """SIGTERM: Celery's warm shutdown, which hands running jobs back (``worker_shutdown``)."""
        with self._lock:
            node.state = "stopping"
            node.signal(signal.SIGTERM)

    def pause(self, node: Node) -> None:
        with self._lock:
            node.state = "paused"
            node.signal(signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        with self._lock:
            if node.state == "paused":
                node.signal(signal.SIGCONT)
                node.state = "up"

    def restart(self, node: Node, *, skew: str | None = None) -> None:
        """Wait for the slot's last process to go (SIGKILL after 15 s), then start a new one."""
        if node.proc is not None and node.state != "down":
            if node.state == "paused":
                node.signal(signal.SIGCONT)
            node.proc.stop(timeout_s=15)
        elif node.proc is not None and node.proc.proc is not None:
            node.proc.proc.wait(timeout=15)
        node.state = "down"
        self.start_node(node, skew=skew)

    def jobs_received(self, node: Node, upto: int | None = None) -> list[str]:
        """Job ids the node's current process has received, in order (from its log, the first ``upto`` bytes)."""
        if not node.logs or not node.logs[-1].exists():
            return []
        data = node.logs[-1].read_bytes()
        return [m.decode() for m in RECEIVED.findall(data if upto is None else data[:upto])]

    # --- server faults ------------------------------------------------------------------------

    def redis_restart(self, down_s: float) -> None:
        """SIGTERM (Redis writes its AOF), ``down_s`` with nothing listening, then the same port and data."""
        self.redis_state = "down"
        self.redis.restart(down_s=down_s)
        self.redis_state = "up"

    def redis_pause(self) -> None:
        assert self.redis.proc is not None
        self.redis_state = "paused"
        os.kill(self.redis.proc.pid, signal.SIGSTOP)

    def redis_resume(self) -> None:
        if self.redis_state == "paused" and self.redis.proc is not None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.redis_state = "up"

    def rabbit_restart(self, down_s: float) -> None:
        """Stop the RabbitMQ node cleanly and start it again on the same ports and data (blocks ~10-30 s).

        ``RabbitMQServer.stop`` removes its data; this keeps it, as a restarted broker host does.
        """
        server = self.rabbit
        assert server is not None and server.proc is not None
        proc = server.proc
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(down_s)
        server.start()

    # --- diagnostics --------------------------------------------------------------------------

    def deliveries(self) -> dict[str, list[tuple[str, str]]]:
        """Job id -> (node log, what happened) for each delivery any node process received or skipped."""
        out: dict[str, list[tuple[str, str]]] = {}
        for node in self.nodes:
            for log in node.logs:
                data = log.read_bytes() if log.exists() else b""
                for job_id in RECEIVED.findall(data):
                    out.setdefault(job_id.decode(), []).append((log.name, "received"))
                for job_id, status in SKIPPED.findall(data):
                    out.setdefault(job_id.decode(), []).append((log.name, f"skipped:{status.decode()}"))
        return out

    def unexpected_exits(self) -> list[dict[str, Any]]:
        return [e for n in self.nodes for e in n.unexpected_exits]
