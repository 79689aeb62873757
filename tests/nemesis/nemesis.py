"""The nemesis: which fault strikes when, drawn from the run's seed.

It injects a fault every ``interval_s`` (drawn), of a kind drawn by weight among those that apply
now (a node to pause must be up), and heals it after a drawn while: see ``KINDS``. Every choice
comes from its own ``random.Random`` seeded from the run's seed, so a seed names a schedule (the
exact interleaving with the processes still varies with the machine's load).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from producers import Client
from tests.nemesis.cluster import VISIBILITY_TIMEOUT_S, Cluster, Node, libfaketime
from tests.nemesis.history import Fault, History
from tests.nemesis.workload import Scheduler, cancel

CLOCK_OFFSET = "15s"

# Fault kind -> weight per broker. Node faults, Redis faults, link faults; RabbitMQ adds its own.
KINDS: dict[str, dict[str, float]] = {
    "redis": {
        "sigkill": 3,
        "sigterm": 2,
        "pause": 3,
        "pause_then_kill": 2,
        "clock_skew": 1,
        "redis_restart": 1.5,
        "redis_pause": 1.5,
        "link_cut": 2,
        "link_blackhole": 2,
        "link_refuse": 1,
    },
    "rabbitmq": {
        "sigkill": 3,
        "sigterm": 2,
        "pause": 2,
        "pause_then_kill": 1,
        "clock_skew": 1,
        "redis_restart": 1,
        "redis_pause": 1,
        "link_cut": 1.5,
        "link_blackhole": 1,
        "broker_restart": 1,
        "amqp_cut": 2,
    },
}


class Nemesis:
    """Injects faults from ``KINDS[broker]`` until told to stop; ``finish()`` heals everything."""

    def __init__(
        self, cluster: Cluster, history: History, seed: int, interval_s: tuple[float, float] = (1.0, 3.0)
    ) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = random.Random(f"nemesis-{seed}")
        self.interval_s = interval_s
        weights = dict(KINDS[cluster.cfg.broker])
        if libfaketime() is None:
            weights.pop("clock_skew")
            history.note("libfaketime missing: no clock_skew faults")
        self.weights = weights
        self.heals = Scheduler()
        self.stop = threading.Event()
        self._background: list[threading.Thread] = []

    def run(self) -> None:
        next_at = time.time() + self.rng.uniform(*self.interval_s)
        while not self.stop.is_set():
            self.heals.run_due(time.time())
            self.cluster.check_nodes()
            if time.time() >= next_at:
                self.strike()
                next_at = time.time() + self.rng.uniform(*self.interval_s)
            time.sleep(0.05)

    def finish(self) -> None:
        """Heal every fault now, wait for background restarts, and make sure every node runs."""
        self.heals.run_due()
        for thread in self._background:
            thread.join(timeout=120)
        self.cluster.redis_resume()
        for node in self.cluster.nodes:
            node.redis_proxy.heal()
            if node.amqp_proxy is not None:
                node.amqp_proxy.heal()
            if node.state == "paused":
                self.cluster.resume(node)
            elif node.state != "up":
                self.cluster.restart(node)
        self.cluster.check_nodes()

    def strike(self) -> None:
        kinds = [k for k in self.weights if self._feasible(k)]
        if not kinds:
            return
        kind = self.rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]
        getattr(self, f"_{kind}")()

    def _feasible(self, kind: str) -> bool:
        if kind == "pause_then_kill":
            return len(self.cluster.up_nodes()) >= 2
        if kind.startswith(("redis_", "broker_")):
            return self.cluster.redis_state == "up" and not any(t.is_alive() for t in self._background)
        return bool(self.cluster.up_nodes())

    def _record(self, kind: str, target: str, detail: str = "") -> Fault:
        marks = {str(n.logs[-1]): n.log_size() for n in self.cluster.nodes if n.logs}
        fault = Fault(kind, target, time.time(), detail=detail, log_marks=marks)
        self.history.add(fault)
        return fault

    def _heal_later(self, fault: Fault, after_s: float, action: Callable[[], None]) -> None:
        def heal() -> None:
            action()
            fault.t_heal = time.time()

        self.heals.at(time.time() + after_s, heal)

    def _node(self) -> Node:
        return self.rng.choice(self.cluster.up_nodes())

    # --- node faults --------------------------------------------------------------------------

    def _sigkill(self) -> None:
        node = self._node()
        fault = self._record("sigkill", node.name)
        self.cluster.kill(node)
        self._heal_later(fault, self.rng.uniform(0.5, 3.0), lambda: self.cluster.restart(node))

    def _sigterm(self) -> None:
        node = self._node()
        fault = self._record("sigterm", node.name)
        self.cluster.terminate(node)
        self._heal_later(fault, self.rng.uniform(0.5, 2.0), lambda: self.cluster.restart(node))

    def _pause(self) -> None:
        node = self._node()
        # Longer than the visibility timeout: the node's messages are delivered again meanwhile.
        paused_s = self.rng.uniform(VISIBILITY_TIMEOUT_S + 0.5, VISIBILITY_TIMEOUT_S + 4.0)
        fault = self._record("pause", node.name, f"{paused_s:.1f}s")
        self.cluster.pause(node)
        self._heal_later(fault, paused_s, lambda: self.cluster.resume(node))

    def _pause_then_kill(self) -> None:
        """Pause one node past the visibility timeout, resume it, then SIGKILL another.

        The paused node's jobs are delivered again and taken over meanwhile; when it wakes, its stale
        deliveries end. Whatever they do to the broker's bookkeeping must not strand the jobs the other
        node took over when that node dies in turn.
        """
        paused, killed = self.rng.sample(self.cluster.up_nodes(), 2)
        paused_s = self.rng.uniform(VISIBILITY_TIMEOUT_S + 1.0, VISIBILITY_TIMEOUT_S + 2.5)
        kill_after_s = self.rng.uniform(0.1, 1.0)
        detail = f"{paused.name} paused {paused_s:.1f}s, then {killed.name} killed {kill_after_s:.1f}s later"
        fault = self._record("pause_then_kill", f"{paused.name}+{killed.name}", detail)
        self.cluster.pause(paused)

        def resume() -> None:
            self.cluster.resume(paused)
            self.heals.at(time.time() + kill_after_s, kill)

        def kill() -> None:
            if killed.state == "up":
                self.cluster.kill(killed)
            self._heal_later(fault, self.rng.uniform(0.5, 2.0), lambda: self.cluster.restart(killed))

        self.heals.at(time.time() + paused_s, resume)

    def _clock_skew(self) -> None:
        node = self._node()
        offset = self.rng.choice("+-") + CLOCK_OFFSET
        fault = self._record("clock_skew", node.name, offset)
        self.cluster.terminate(node)
        self.cluster.restart(node, skew=offset)
        skewed_s = self.rng.uniform(8.0, 16.0)
        self._heal_later(fault, skewed_s, lambda: self._unskew(node))

    def _unskew(self, node: Node) -> None:
        if node.skew is not None and node.state == "up":
            self.cluster.terminate(node)
            self.cluster.restart(node)

    # --- link faults (one node's connections, through its proxy) -----------------------------

    def _link_cut(self) -> None:
        node = self._node()
        fault = self._record("link_cut", node.name, f"{node.redis_proxy.cut()} connections")
        fault.t_heal = time.time()
        self._cancel_on(node)

    def _link_blackhole(self) -> None:
        node = self._node()
        # Sometimes past the lease TTL (3 s): the node's in-flight leases are not renewed meanwhile.
        held_s = self.rng.uniform(1.0, 6.0)
        fault = self._record("link_blackhole", node.name, f"{held_s:.1f}s")
        node.redis_proxy.blackhole(held_s)
        self._heal_later(fault, held_s, lambda: None)

    def _link_refuse(self) -> None:
        node = self._node()
        refused_s = self.rng.uniform(1.0, 3.0)
        fault = self._record("link_refuse", node.name, f"cut, then refused {refused_s:.1f}s")
        node.redis_proxy.refuse(refused_s)
        node.redis_proxy.cut()
        self._cancel_on(node)
        self._heal_later(fault, refused_s, lambda: None)

    def _amqp_cut(self) -> None:
        node = self._node()
        assert node.amqp_proxy is not None
        fault = self._record("amqp_cut", node.name, f"{node.amqp_proxy.cut()} connections")
        fault.t_heal = time.time()

    def _cancel_on(self, node: Node) -> None:
        """Cancel a job the node is running right after its links dropped (its cancel listener resubscribes)."""
        mine = set(self.cluster.jobs_received(node))
        running = [j for j in self.history.active_jobs() if j in mine]
        tags = self.history.job_ids()
        chosen = self.rng.sample(running, min(len(running), self.rng.randint(1, 2)))

        def cancel_chosen() -> None:
            with Client(settings=self.cluster.settings) as client:
                for job_id in chosen:
                    cancel(client, self.history, job_id, tags.get(job_id, "?"), "after_cut")

        # In a thread: with Redis paused a cancel blocks, and this thread must stay free to heal it.
        if chosen:
            threading.Thread(target=cancel_chosen, name="cancel-after-cut", daemon=True).start()

    # --- server faults ------------------------------------------------------------------------

    def _redis_restart(self) -> None:
        down_s = self.rng.uniform(0.3, 2.0)
        fault = self._record("redis_restart", "redis", f"down {down_s:.1f}s")
        self.cluster.redis_restart(down_s)
        fault.t_heal = time.time()

    def _redis_pause(self) -> None:
        paused_s = self.rng.uniform(1.0, 4.0)
        fault = self._record("redis_pause", "redis", f"{paused_s:.1f}s")
        self.cluster.redis_pause()
        self._heal_later(fault, paused_s, self.cluster.redis_resume)

    def _broker_restart(self) -> None:
        down_s = self.rng.uniform(0.5, 2.0)
        fault = self._record("broker_restart", "rabbitmq", f"down {down_s:.1f}s")

        def restart() -> None:
            self.cluster.rabbit_restart(down_s)
            fault.t_heal = time.time()

        thread = threading.Thread(target=restart, name="broker-restart", daemon=True)
        self._background.append(thread)
        thread.start()
