"""Local processes for the demo, the tests and the benchmarks: a private redis-server (optionally with
passwords, ACL users and TLS), a private RabbitMQ node, real worker processes, free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import redis

from harness.proxy import TcpProxy
from moonq.broker import producer_app
from moonq.settings import ClientSettings

REDIS_MISSING = (
    "redis-server was not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`;"
    " macOS: `brew install redis`) or set REDIS_URL to a Redis you run."
)
RABBITMQ_MISSING = (
    "rabbitmq-server was not found. Install it (Debian/Ubuntu: `sudo apt-get install rabbitmq-server`;"
    " macOS: `brew install rabbitmq`) or set CELERY_BROKER_URL to a RabbitMQ you run."
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


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, timeout_s: float, log: Callable[[], str], what: str = "the server"
) -> None:
    """Block until ``proc`` listens on 127.0.0.1:``port``; if it exits or times out first, raise with its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout_s}s"
                raise RuntimeError(f"{what} {state}; the end of its log:\n{log()[-2000:]}") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate and a server certificate (with its key) signed by it, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> TlsFiles:
    """A throwaway CA and a server certificate for ``hosts``, made with the openssl command line (1 day)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl was not found on PATH (Debian/Ubuntu: `sudo apt-get install openssl`)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(ca=d / "ca.crt", cert=d / "server.crt", key=d / "server.key")
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    (d / "san.cnf").write_text(f"subjectAltName={san}\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=moonq throwaway CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(files.ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={hosts[0]}",
        "-keyout",
        str(files.key),
        "-out",
        str(d / "server.csr"),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(d / "server.csr"),
        "-CA",
        str(files.ca),
        "-CAkey",
        str(d / "ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(d / "san.cnf"),
        "-out",
        str(files.cert),
    )
    return files


class RedisServer:
    """A throwaway redis-server on a free port; nothing persisted, everything removed on stop.

    Args:
        password: the ``default`` user's password (``requirepass``).
        users: ACL users to create, name -> password, each with ``user_rules`` (default: every key,
            channel and command).
        tls: serve TLS only (no plain port), with this certificate; clients need not present one.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        users: Mapping[str, str] | None = None,
        user_rules: tuple[str, ...] = ("~*", "&*", "+@all"),
        tls: TlsFiles | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        self.port = port or free_port()
        self.password = password
        self.users = dict(users or {})
        self.tls = tls
        self._dir = tempfile.mkdtemp(prefix="moonq-redis-")
        listen = ["--port", str(self.port)]
        if tls is not None:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                str(tls.cert),
                "--tls-key-file",
                str(tls.key),
                "--tls-ca-cert-file",
                str(tls.ca),
            ]
        auth = ["--requirepass", password] if password is not None else []
        for name, secret in self.users.items():
            auth += ["--user", name, "on", f">{secret}", *user_rules]
        self._cmd = [
            binary,
            *listen,
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
            *auth,
            *extra_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A URL that logs in: as the first ACL user if any, else with the default user's password."""
        user = next(iter(self.users), None)
        return self.url_for(user)

    def url_for(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """The URL for ``user`` (None: the default user) with its password, or with ``password`` if given."""
        secret = password if password is not None else self.users.get(user, "") if user else self.password
        userinfo = f"{quote(user or '', safe='')}:{quote(secret, safe='')}@" if secret else ""
        scheme = "rediss" if self.tls else "redis"
        query = "?" + urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": str(self.tls.ca)}) if self.tls else ""
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}/{db}{query}"

    def log(self) -> str:
        """The server's log, after what it printed before it had one (say, a fatal config error)."""
        files = [Path(self._dir) / "redis.out", Path(self._dir) / "redis.log"]
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def start(self) -> RedisServer:
        with (Path(self._dir) / "redis.out").open("ab") as out:
            self.proc = subprocess.Popen(self._cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, 10.0, self.log, "redis-server")
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


def rabbitmq_binary() -> str | None:
    """The rabbitmq-server start script, or None if RabbitMQ is not installed.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the ``rabbitmq`` user (who
    could not read our private directories); the script it wraps runs as the caller, so prefer it.
    """
    for wrapped in ("/usr/lib/rabbitmq/bin/rabbitmq-server",):
        if os.access(wrapped, os.X_OK):
            return wrapped
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which("rabbitmq-server", path=path)


class RabbitMQServer:
    """A throwaway RabbitMQ node: its own node name, free AMQP and distribution ports on 127.0.0.1,
    data, logs and Erlang cookie in a temporary directory, no plugins; all removed on stop.

    Args:
        consumer_timeout_ms: the server-wide delivery acknowledgement timeout (``consumer_timeout``).
    """

    def __init__(self, *, consumer_timeout_ms: int | None = 7_200_000, start_timeout_s: float = 90.0) -> None:
        binary = rabbitmq_binary()
        if binary is None:
            raise RuntimeError(RABBITMQ_MISSING)
        self.port = free_port()
        self.dist_port = free_port()
        self.nodename = f"moonq-test-{os.getpid()}-{self.port}@localhost"
        self.start_timeout_s = start_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="moonq-rabbitmq-"))
        (self._dir / "enabled_plugins").write_text("[].\n")  # no management plugin, nor any other
        (self._dir / "rabbitmq-env.conf").write_text("")  # not the system's (its NODENAME, say)
        conf = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "log.console = false", "log.file.level = warning"]
        if consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {consumer_timeout_ms}")
        (self._dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        self.env = {
            **os.environ,
            "HOME": str(self._dir),  # the node's own Erlang cookie
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self._dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self._dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self._dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self._dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self._dir / "advanced.config"),  # absent: none
            "RABBITMQ_CONF_ENV_FILE": str(self._dir / "rabbitmq-env.conf"),
            # Erlang distribution on loopback only.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self._cmd = [binary]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def log(self) -> str:
        out = self._dir / "server.out"
        return out.read_text(errors="replace") if out.exists() else ""

    def start(self) -> RabbitMQServer:
        with (self._dir / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                self._cmd, env=self.env, cwd=self._dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_listening(self.proc, self.port, self.start_timeout_s, self.log, "rabbitmq-server")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (the start script stops the node cleanly), then SIGKILL to its process group."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            try:  # whatever is left of the node (beam.smp and its helpers) is in the group it started
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RabbitMQServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """``celery -A worker worker`` as users start it, in its own process group, logging to a file.

    Args:
        env: overrides on top of this process's environment (REDIS_URL, MOONSHOT_*, MOONQ_*).
        args: extra command-line arguments for the worker.
        cwd: the directory it starts in (None: this process's).
    """

    def __init__(
        self, env: dict[str, str], *, args: tuple[str, ...] = (), log_path: Path | None = None, cwd: Path | None = None
    ) -> None:
        self.env = {**os.environ, **env}
        self.cwd = cwd  # where ``-A worker`` is imported from (a benchmark's baseline checkout); None: here
        self.cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", *args]
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="moonq-worker-")) / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout_s: float = 60.0) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)
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


class SentinelSet:
    """A Sentinel-managed Redis: a primary, one replica (``--replicaof``) and three sentinels
    (``redis-server <conf> --sentinel``, quorum 2), all on free ports of 127.0.0.1, each sentinel
    with its own config file (Sentinel rewrites it) in a temporary directory; all removed on stop.

    ``kill_primary()`` SIGKILLs whichever server the sentinels name as primary;
    ``wait_for_new_primary()`` blocks until they name another. Failure is declared after
    ``down_after_ms`` without an answer (1 s here, 30 s in Redis' sample config).

    Args:
        master: the name the sentinels monitor the primary under.
        password: the data nodes' ``default`` password (``requirepass``, and ``masterauth`` so the
            replica, and the primary once demoted, can sync).
        sentinel_password: the sentinels' own ``requirepass``.
        replication_proxy: the replica syncs through a ``TcpProxy`` (``replication_link``), so a
            test can hold replication back (``blackhole``) while the primary acknowledges writes.
    """

    def __init__(
        self,
        master: str = "moonq",
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        replication_proxy: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        self.binary = binary
        self.master = master
        self.password = password
        self.sentinel_password = sentinel_password
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        # A replica's first full sync starts at once instead of after Redis' default 5 s wait for more replicas.
        sync = ("--repl-diskless-sync-delay", "0")
        self.primary = RedisServer(extra_args=(*auth, *sync))
        self.replication_link = TcpProxy(self.primary.port, port=free_port()) if replication_proxy else None
        upstream = self.replication_link.port if self.replication_link else self.primary.port
        self.replica = RedisServer(extra_args=(*auth, *sync, "--replicaof", "127.0.0.1", str(upstream)))
        self.servers = [self.primary, self.replica]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._dir = Path(tempfile.mkdtemp(prefix="moonq-sentinel-"))
        for port in self.sentinel_ports:
            conf = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {self._dir}",
                f"logfile {self._dir / f'sentinel-{port}.log'}",
                f"sentinel monitor {master} 127.0.0.1 {self.primary.port} 2",
                f"sentinel down-after-milliseconds {master} {down_after_ms}",
                f"sentinel failover-timeout {master} {failover_timeout_ms}",
            ]
            if password:
                conf.append(f"sentinel auth-pass {master} {password}")
            if sentinel_password:
                conf.append(f"requirepass {sentinel_password}")
            (self._dir / f"sentinel-{port}.conf").write_text("\n".join(conf) + "\n")
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def url(self, db: int = 0) -> str:
        """moonq's Sentinel URL for this set (docs/contract.md): every sentinel, the master's name, ``db``."""
        userinfo = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        query = "?" + urlencode({"sentinel_password": self.sentinel_password}) if self.sentinel_password else ""
        return f"redis+sentinel://{userinfo}{hosts}/{self.master}/{db}{query}"

    def log(self) -> str:
        return "".join(f.read_text(errors="replace") for f in sorted(self._dir.glob("*.log")))

    def _ask(self, port: int, *command: str) -> Any:
        """One command to the sentinel on ``port``; None when it does not answer."""
        client = redis.Redis(port=port, password=self.sentinel_password, socket_timeout=1.0, decode_responses=True)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the sentinels name it; None while they disagree or cannot say."""
        named = []
        for port in self.sentinel_ports:
            answer = self._ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
            if isinstance(answer, list | tuple) and len(answer) == 2:
                named.append(int(answer[1]))
        best = max(set(named), key=named.count, default=None)
        return best if best is not None and named.count(best) >= 2 else None

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def _ready(self) -> bool:
        # The replica holds the primary's data, and each sentinel knows it and the two other
        # sentinels: a failover can get its quorum and has a replica to promote.
        replica = redis.Redis(port=self.replica.port, password=self.password, socket_timeout=1.0, decode_responses=True)
        try:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        except (redis.RedisError, OSError):
            return False
        finally:
            replica.close()
        for port in self.sentinel_ports:
            fields = self._ask(port, "SENTINEL", "MASTER", self.master)
            if not isinstance(fields, dict):
                return False
            if int(fields.get("num-slaves", 0)) == 0 or int(fields.get("num-other-sentinels", 0)) != 2:
                return False
        return True

    def start(self, timeout_s: float = 30.0) -> SentinelSet:
        try:
            if self.replication_link is not None:
                self.replication_link.start()
            for server in self.servers:
                server.start()
            for port in self.sentinel_ports:
                conf = self._dir / f"sentinel-{port}.conf"
                with (self._dir / f"sentinel-{port}.out").open("ab") as out:
                    self.sentinels.append(
                        subprocess.Popen([self.binary, str(conf), "--sentinel"], stdout=out, stderr=subprocess.STDOUT)
                    )
            for proc, port in zip(self.sentinels, self.sentinel_ports, strict=True):
                wait_listening(proc, port, 10.0, self.log, "redis-server --sentinel")
            deadline = time.monotonic() + timeout_s
            # Sentinels find each other through hello messages on the primary, every 2 s.
            while not self._ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sentinels did not discover each other; their logs:\n{self.log()[-3000:]}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def kill_primary(self) -> RedisServer:
        """SIGKILL the server the sentinels name as primary (no shutdown, no last write); returns it."""
        port = self.primary_port()
        if port is None:
            raise RuntimeError("the sentinels name no primary")
        server = self.server_on(port)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        return server

    def wait_for_new_primary(self, old_port: int, timeout_s: float = 30.0) -> RedisServer:
        """Block until a majority of the sentinels name a primary other than ``old_port``; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            port = self.primary_port()
            if port is not None and port != old_port:
                return self.server_on(port)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover after {timeout_s}s; the sentinels' logs:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for server in self.servers:
            server.stop()
        if self.replication_link is not None:
            self.replication_link.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ClusterSet:
    """A Redis Cluster of three primaries and no replicas (``--cluster-enabled``), on free ports of
    127.0.0.1, joined by ``redis-cli --cluster create`` (each primary serves a third of the 16384
    slots); the nodes' cluster config files in a temporary directory; all removed on stop.

    A primary that stops leaves its slots without a server (nothing to fail over to): enough for the
    clients' tests, not for failover ones.
    """

    def __init__(self, size: int = 3, *, node_timeout_ms: int = 2000) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError(REDIS_MISSING.replace("redis-server", "redis-cli", 1))
        self.cli = cli
        self._dir = Path(tempfile.mkdtemp(prefix="moonq-cluster-"))
        self.servers: list[RedisServer] = []
        for _ in range(size):
            # Redis refuses a port above 55535 in cluster mode (its default bus port is port + 10000),
            # even with the bus on a port of its own, which it gets here (free, like the client port).
            port = free_port()
            while port > 55535:
                port = free_port()
            cluster = (
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(free_port()),
                "--cluster-config-file",
                str(self._dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
            )
            self.servers.append(RedisServer(port, extra_args=cluster))

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        """moonq's Cluster URL for this set: two of its nodes (a client learns the third from them)."""
        return f"redis+cluster://{','.join(f'127.0.0.1:{port}' for port in self.ports[:2])}/"

    def log(self) -> str:
        return "".join(server.log() for server in self.servers)

    def _state_ok(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1.0, decode_responses=True)
        try:
            info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        return "cluster_state:ok" in str(info)  # the server's own text: redis-py leaves CLUSTER INFO raw

    def start(self, timeout_s: float = 30.0) -> ClusterSet:
        try:
            for server in self.servers:
                server.start()
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            created = subprocess.run(
                [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{created.stdout[-2000:]}{created.stderr[-2000:]}"
                )
            deadline = time.monotonic() + timeout_s
            # Every node must see every slot served (the nodes agree through the cluster bus, ~1 s).
            while not all(self._state_ok(port) for port in self.ports):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not reach cluster_state:ok; its logs:\n{self.log()[-3000:]}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ClusterSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
