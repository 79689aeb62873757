"""Local processes for the demo, the tests and the benchmarks: a private redis-server, a
Sentinel-managed Redis (a primary, a replica, three sentinels), a RabbitMQ node, moonq worker nodes
started as users start them (``celery -A worker worker``), TLS files, and a TCP proxy that cuts or
black-holes one process's links (``TcpProxy``).

Not part of the SDK a producing service imports, nor of a worker node: it exists so that
``moonq demo``, ``tests/`` and ``bench/`` start real servers the same way.
"""

from harness.processes import (
    RABBITMQ_MISSING,
    REDIS_MISSING,
    RabbitMQServer,
    RedisServer,
    SentinelSet,
    TlsFiles,
    WorkerProcess,
    free_port,
    make_tls_files,
    rabbitmq_binary,
    wait_for_port,
    wait_listening,
)
from harness.proxy import TcpProxy

__all__ = [
    "RABBITMQ_MISSING",
    "REDIS_MISSING",
    "RabbitMQServer",
    "RedisServer",
    "SentinelSet",
    "TcpProxy",
    "TlsFiles",
    "WorkerProcess",
    "free_port",
    "make_tls_files",
    "rabbitmq_binary",
    "wait_for_port",
    "wait_listening",
]
