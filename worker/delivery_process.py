"""The delivery worker in a process of its own, beside the node: off the job path, and off its GIL.

Deliveries (worker/deliveries.py) cost CPU: reading the job's record, building and signing the
body, an HTTP request. On the node's own loop that CPU is taken from the jobs it streams, one
interpreter lock for both. So by default (``MOONQ_WEBHOOK_PROCESS``, on) a node runs them in a child
process:

- ``DeliveryProcess`` (in the node) starts ``python -m worker.delivery_process``, hands it its
  settings on stdin — without the upstream API key, which a delivery never needs, and with the
  key's variables taken out of its environment —, restarts it if it dies (backing off up to
  ``RESTART_MAX_S``), and stops it with the node (SIGTERM, then SIGKILL).
- The child asks the kernel to SIGTERM it when the node dies (``PR_SET_PDEATHSIG``) and checks its
  parent every second besides, so a node killed with SIGKILL leaves no delivery process behind; once
  told to stop it exits within ``EXIT_GRACE_S`` even if its loop missed the cancel.
  Deliveries it had begun stay pending in the stream and are taken over (at least once).
- Metrics: the child counts into a ``Tally`` that it writes to stdout as one JSON line every
  ``RELAY_EVERY_S``; the node reads the lines and adds them to its own metrics, so ``/metrics``
  shows deliveries wherever they ran. Logs go to the node's stderr, tagged ``[deliveries]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

from worker.deliveries import DeliveryWorker, Tally
from worker.settings import Settings

log = logging.getLogger("moonq.worker")

RELAY_EVERY_S = 0.5
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
STOP_GRACE_S = 10.0
# What the child must not have: the upstream key (a delivery never calls the upstream).
_KEY_ENV = ("MOONSHOT_API_KEY", "MOONSHOT_API_KEY_FILE")
_KEY_FIELDS = {"moonshot_api_key", "moonshot_api_key_file"}
_PR_SET_PDEATHSIG = 1
# Told to stop (SIGTERM, or its node gone), the child exits this long after at the latest.
EXIT_GRACE_S = 5.0


def child_settings(settings: Settings) -> str:
    """The settings the child runs with, as JSON: everything but the API key (the webhook secret in clear)."""
    data = settings.model_dump(mode="json", exclude=_KEY_FIELDS)
    data["webhook_secret"] = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    return json.dumps(data)


class DeliveryProcess:
    """The node's side: start, watch, restart and stop the child; fold its metrics into the node's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[str] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="moonq-deliveries", daemon=True)

    def start(self) -> DeliveryProcess:
        self._spawn()
        self._watcher.start()
        return self

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _KEY_ENV}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.delivery_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(child_settings(self.settings) + "\n")
        proc.stdin.close()
        threading.Thread(target=_relay, args=(proc.stdout,), name="moonq-deliveries-metrics", daemon=True).start()
        self.proc = proc
        log.info("event=deliveries_process_started pid=%s", proc.pid)

    def _watch(self) -> None:
        wait_s = RESTART_MIN_S
        while not self._stopping.is_set():
            proc = self.proc
            if proc is not None and proc.poll() is not None and not self._stopping.is_set():
                log.warning("event=deliveries_process_died pid=%s code=%s; restarting", proc.pid, proc.returncode)
                if self._stopping.wait(wait_s):
                    return
                self.restarts += 1
                started = time.monotonic()
                self._spawn()
                # Back off while it keeps dying at once; a child that lived a while starts the count afresh.
                wait_s = RESTART_MIN_S if time.monotonic() - started > RESTART_MAX_S else min(wait_s * 2, RESTART_MAX_S)
            self._stopping.wait(0.5)

    def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _relay(stream: IO[str]) -> None:
    """Read the child's tallies until it exits, adding each to the node's metrics."""
    for line in stream:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            Tally.apply(json.loads(line))


# ---- the child ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (elsewhere the parent check alone)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def _serve(settings: Settings, parent: int) -> None:
    tally = Tally(relay=True)
    worker = DeliveryWorker(settings, tally)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    exiting: list[asyncio.TimerHandle] = []

    def stop() -> None:
        main.cancel()
        # A cancel that lands inside a Redis call is lost at times (redis-py 8.1; worker/ratelimit.py): the
        # process goes after EXIT_GRACE_S whatever its loop does. Orphans of SIGKILLed nodes were found alive
        # 40 minutes on. Deliveries it had begun stay pending in the stream and are taken over.
        if not exiting:
            exiting.append(loop.call_later(EXIT_GRACE_S, os._exit, 0))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)

    async def watch_parent() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("event=deliveries_parent_gone; stopping")
        stop()

    async def relay() -> None:
        while True:
            await asyncio.sleep(RELAY_EVERY_S)
            tally.flush(sys.stdout)

    helpers = [asyncio.create_task(watch_parent()), asyncio.create_task(relay())]
    try:
        await worker.run()
    except asyncio.CancelledError:
        pass
    finally:
        for task in helpers:
            task.cancel()
        with contextlib.suppress(Exception):
            await worker.aclose()
        tally.flush(sys.stdout)


def main() -> None:
    parent = os.getppid()
    _die_with_parent()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="[%(asctime)s: %(levelname)s/%(name)s[deliveries]] %(message)s"
    )
    data: dict[str, Any] = json.loads(sys.stdin.readline())
    settings = Settings(**data)
    asyncio.run(_serve(settings, parent))


if __name__ == "__main__":
    main()
