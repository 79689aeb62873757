"""Local processes for the demo, the tests and the benchmarks: a private redis-server, free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from producers.broker import producer_app
from producers.settings import ClientSettings

REDIS_MISSING = (
    "redis-server was not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`;"
    " macOS: `brew install redis`) or set REDIS_URL to a Redis you run."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.02)


class RedisServer:
    """A throwaway redis-server on a free port; nothing persisted, everything removed on stop."""

    def __init__(self, port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="moonq-redis-")
        self._cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--logfile",
            str(Path(self._dir) / "redis.log"),
            *extra_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server (SIGTERM, so it writes its AOF if it keeps one); ``keep_data`` for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not keep_data:
            shutil.rmtree(self._dir, ignore_errors=True)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop and start again on the same port with the same data directory."""
        self.stop(keep_data=True)
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """``celery -A worker worker`` as users start it, in its own process group, logging to a file.

    Args:
        env: overrides on top of this process's environment (REDIS_URL, MOONSHOT_*, MOONQ_*).
        args: extra command-line arguments for the worker.
    """

    def __init__(self, env: dict[str, str], *, args: tuple[str, ...] = (), log_path: Path | None = None) -> None:
        self.env = {**os.environ, **env}
        self.cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", *args]
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="moonq-worker-")) / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout_s: float = 60.0) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout_s)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the node answers a ping on the broker."""
        assert self.proc is not None
        settings = ClientSettings(
            redis_url=self.env["REDIS_URL"],
            broker_url=self.env.get("CELERY_BROKER_URL", ""),
            prefix=self.env.get("MOONQ_PREFIX", "moonq"),
        )
        app = producer_app(settings)
        deadline = time.monotonic() + timeout_s
        try:
            while not app.control.ping(timeout=0.5):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start; the end of its log:\n{self.log()[-2000:]}")
        finally:
            app.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
