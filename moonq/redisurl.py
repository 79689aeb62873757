"""``REDIS_URL`` in its three forms, and the one place that turns it into clients.

A plain ``redis://``, ``rediss://`` or ``unix://`` URL names one server. A Sentinel URL names the
sentinels that watch a replicated primary, and the primary by its Sentinel name::

    redis+sentinel://[user:pass@]host1:26379,host2:26379/<master>/<db>[?sentinel_password=...&ssl=true&...]

``user:pass`` log in to the data nodes (primary and replicas); ``sentinel_username`` and
``sentinel_password`` to the sentinels. ``ssl=true`` speaks TLS to both, with the options a
``rediss://`` URL takes (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_check_hostname``); any other query parameter goes to the data-node connections as it would
in a plain URL. A port left out is Sentinel's 26379; a db left out is 0.

Clients on a Sentinel URL ask the sentinels for the primary's address at every (re)connect, so
after a failover the next retry of a failed command reaches the new primary (redis-py's
``SentinelConnectionPool``, with the connection classes below: redis-py 8.1's own skip the lookup
on one reconnect path). ``sync_redis`` and ``async_redis`` build either kind; the bounded,
retrying client of long-lived processes is ``moonq.connect.resilient_redis``. The Celery broker
gets kombu's own form of the same URL from ``kombu_sentinel``.

A Cluster URL names some of a Redis Cluster's primaries, from which a client learns the rest and the
slots each one serves::

    redis+cluster://[user:pass@]host1:7000,host2:7001/[?ssl=true&...]

``user:pass`` log in to every node; ``ssl=true`` and the other query parameters mean what they mean
in the Sentinel form. A port left out is 6379; there is no db (a Cluster has only db 0). Such a URL
serves the data plane only: ``sync_redis`` and ``async_redis`` build redis-py's ``RedisCluster``
(sync or asyncio) on it, which follows the cluster's redirects and failovers itself, but the Celery
broker cannot be one (kombu has no Cluster transport; moonq/settings.py refuses it).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.connection import parse_url
from redis.driver_info import DriverInfo

SENTINEL_SCHEME = "redis+sentinel"
# The sync client's bound, and the longest a command waits for a free connection (``sync_redis``).
SYNC_MAX_CONNECTIONS = 100
# What every connection tells Redis it is (CLIENT SETINFO), made once: left to redis-py, each new
# connection looks its version up in the installed packages' metadata (importlib.metadata, ~1-2 ms), and a
# node whose pool grows by 200 connections in a burst of job starts spent 7% of its CPU there.
DRIVER_INFO = DriverInfo()


def with_driver_info(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a client or pool, with the connections' ``DRIVER_INFO`` unless one is given."""
    if "driver_info" not in kwargs and "lib_name" not in kwargs and "lib_version" not in kwargs:
        kwargs["driver_info"] = DRIVER_INFO
    return kwargs


POOL_WAIT_S = 30.0
SENTINEL_PORT = 26379
CLUSTER_SCHEME = "redis+cluster"
CLUSTER_PORT = 6379
# Query parameters that are the sentinels' (the rest go to the data nodes, as in a rediss:// URL).
_SENTINEL_PARAMS = ("sentinel_username", "sentinel_password")
# TLS options that apply to the sentinels' connections too: one deployment, one CA.
_TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() == SENTINEL_SCHEME if "://" in url else False


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL (module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False
    # The data nodes' other query parameters, as given (redis-py parses them as for a plain URL).
    params: tuple[tuple[str, str], ...] = ()

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for each data-node connection: credentials, db, TLS and the URL's options."""
        scheme = "rediss" if self.ssl else "redis"
        # redis-py's own parser, so the options mean what they mean in a plain URL.
        kwargs: dict[str, Any] = parse_url(f"{scheme}://localhost/{self.db}?{urlencode(self.params)}")  # type: ignore[no-untyped-call]
        for name in ("host", "port", "connection_class"):
            kwargs.pop(name, None)
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.ssl:
            kwargs["ssl"] = True  # SentinelConnectionPool picks its TLS connection class from this
            kwargs.setdefault("ssl_cert_reqs", "required")
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the connections to the sentinels."""
        data = self.connection_kwargs()
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k.startswith("socket_")}
        if self.ssl:
            kwargs.update({k: v for k, v in data.items() if k == "ssl" or k in _TLS_PARAMS})
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs


def _split_url(url: str, scheme_wanted: str, what: str) -> tuple[str | None, str | None, str, str, str]:
    """``(username, password, hosts, path, query)`` of a multi-host URL; ValueError for another scheme."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != scheme_wanted:
        raise ValueError(f"{what}: the scheme must be {scheme_wanted}://, not {scheme or 'missing'}")
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    # The last '@' ends the user info, even when a password holds an unescaped '@'.
    userinfo, at, location = rest.rpartition("@")
    hosts, _, path = location.partition("/")
    username, password = None, None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    return username, password, hosts, path, query


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` URL.

    Raises:
        ValueError: naming the part that is wrong (scheme, a sentinel's host or port, the master
            name, the db, the ``ssl`` flag).
    """
    username, password, hosts, path, query = _split_url(url, SENTINEL_SCHEME, "Sentinel URL")
    sentinels = tuple(_sentinel_address(part) for part in hosts.split(","))
    segments = path.split("/")
    master = unquote(segments[0])
    if not master:
        raise ValueError("Sentinel URL: the master name (the first path segment, /<master>/<db>) is missing")
    db_text = segments[1] if len(segments) > 1 else ""
    if len(segments) > 2 and any(segments[2:]):
        raise ValueError(f"Sentinel URL: unexpected path after the db: /{'/'.join(segments[2:])}")
    if db_text and not db_text.isdigit():
        raise ValueError(f"Sentinel URL: the db (the second path segment) must be a number, not {db_text!r}")
    pairs = parse_qsl(query, keep_blank_values=True)
    options = dict(pairs)
    flag = options.get("ssl", "false").lower()
    if flag not in _TRUE + _FALSE:
        raise ValueError(f"Sentinel URL: ssl must be true or false, not {options['ssl']!r}")
    return SentinelUrl(
        sentinels=sentinels,
        master=master,
        db=int(db_text or 0),
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        ssl=flag in _TRUE,
        params=tuple((k, v) for k, v in pairs if k not in _SENTINEL_PARAMS and k != "ssl"),
    )


def _sentinel_address(part: str) -> tuple[str, int]:
    return _address(part, "Sentinel URL", "sentinel", SENTINEL_PORT)


def _address(part: str, what: str, role: str, default_port: int) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` of a sentinel or a cluster node; errors start with ``what``."""
    if not part:
        raise ValueError(f"{what}: a {role} address is empty (expected host:port,host:port)")
    if part.startswith("["):  # [IPv6]:port
        host, bracket, port_text = part[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"{what}: {role} address {part!r} is not [ipv6]:port")
        port_text = port_text[1:]
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise ValueError(f"{what}: {role} address {part!r} has no host")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"{what}: {role} {host!r} has port {port_text!r}, not a number from 1 to 65535")
    return unquote(host), int(port_text or default_port)


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() == CLUSTER_SCHEME if "://" in url else False


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL (module docstring)."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    # The nodes' other query parameters, as given (redis-py parses them as for a plain URL).
    params: tuple[tuple[str, str], ...] = ()

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a ``RedisCluster``: credentials, TLS and the URL's options, for every node."""
        scheme = "rediss" if self.ssl else "redis"
        kwargs: dict[str, Any] = parse_url(f"{scheme}://localhost?{urlencode(self.params)}")  # type: ignore[no-untyped-call]
        # RedisCluster refuses a db argument, even 0; TLS is its ssl flag, not a connection class.
        for name in ("host", "port", "db", "connection_class"):
            kwargs.pop(name, None)
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.ssl:
            kwargs["ssl"] = True
            kwargs.setdefault("ssl_cert_reqs", "required")
        return kwargs


def parse_cluster_url(url: str) -> ClusterUrl:
    """Parse a ``redis+cluster://`` URL.

    Raises:
        ValueError: naming the part that is wrong (scheme, a node's host or port, a db other than
            0, the ``ssl`` flag, an option redis-py cannot read).
    """
    username, password, hosts, path, query = _split_url(url, CLUSTER_SCHEME, "Cluster URL")
    nodes = tuple(_address(part, "Cluster URL", "node", CLUSTER_PORT) for part in hosts.split(","))
    if path.rstrip("/") not in ("", "0"):
        raise ValueError(f"Cluster URL: Redis Cluster has only db 0, not /{path}")
    pairs = parse_qsl(query, keep_blank_values=True)
    options = dict(pairs)
    if options.get("db", "0") not in ("", "0"):
        raise ValueError(f"Cluster URL: Redis Cluster has only db 0, not db={options['db']}")
    flag = options.get("ssl", "false").lower()
    if flag not in _TRUE + _FALSE:
        raise ValueError(f"Cluster URL: ssl must be true or false, not {options['ssl']!r}")
    parsed = ClusterUrl(
        nodes=nodes,
        username=username,
        password=password,
        ssl=flag in _TRUE,
        params=tuple((k, v) for k, v in pairs if k not in ("ssl", "db")),
    )
    try:
        parsed.connection_kwargs()  # an option redis-py cannot read is refused now, not at the first connect
    except ValueError as err:  # redis-py names the option, never its value
        raise ValueError(f"Cluster URL: {err}") from None
    return parsed


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (sync or asyncio), as ``sync_redis``/``async_redis`` build one."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


# Keyword arguments of a plain client's connection pool that RedisCluster does not take: the sync one
# would hand them to each node's own pool (where a Sentinel or blocking pool class means nothing) and
# the asyncio one refuses them (its nodes keep their connections without a pool object). Dropped.
_POOL_ONLY = ("connection_pool", "connection_pool_class", "timeout", "queue_class")


def _cluster_kwargs(parsed: ClusterUrl, kwargs: dict[str, Any]) -> dict[str, Any]:
    # A caller's kwargs win over the URL's options, as they do in redis-py's own from_url.
    return {**parsed.connection_kwargs(), **{k: v for k, v in kwargs.items() if k not in _POOL_ONLY}}


# redis-py (8.1) asks the sentinels for the primary only in a Sentinel-managed connection's
# ``connect()``. A connection that broke under a command and is reconnected by that command's own
# retries (``send_packed_command`` -> ``connect_check_health``) dials the address it had, the dead
# primary's, until the retries run out: seen as a node's event pipeline stuck for a minute after a
# failover while fresh connections had long found the new primary. These classes send that path
# through ``connect()`` too (``connect_to`` passes ``retry_socket_connect=False`` and reaches redis-py's).


class SentinelConnection(redis.sentinel.SentinelManagedConnection):
    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self.is_connected:
            return
        if retry_socket_connect:
            self.connect()  # type: ignore[no-untyped-call]
            return
        super().connect_check_health(check_health=check_health, retry_socket_connect=False)


class SentinelSSLConnection(SentinelConnection, redis.SSLConnection):
    pass


class SentinelPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's Sentinel pool with the connections above (``ssl=True`` picks the TLS one)."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs.setdefault("connection_class", SentinelSSLConnection if tls else SentinelConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]


class BlockingSentinelPool(SentinelPool, redis.BlockingConnectionPool):
    """The Sentinel pool (the primary's address at each connect) with the blocking pool's bound."""


class AsyncSentinelConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self.is_connected:
            return
        if retry_socket_connect:
            await self.connect()  # type: ignore[no-untyped-call]
            return
        await super().connect_check_health(check_health=check_health, retry_socket_connect=False)


class AsyncSentinelSSLConnection(AsyncSentinelConnection, redis.asyncio.SSLConnection):
    pass


class AsyncSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """As ``SentinelPool``, for redis.asyncio."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs.setdefault("connection_class", AsyncSentinelSSLConnection if tls else AsyncSentinelConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]


class _SyncSentinelRedis(redis.Redis):
    """A client on the primary that also closes its connections to the sentinels when closed."""

    sentinels: tuple[redis.Redis, ...] = ()

    def close(self) -> None:
        super().close()
        for sentinel in self.sentinels:
            sentinel.close()


class _AsyncSentinelRedis(redis.asyncio.Redis):
    """As ``_SyncSentinelRedis``, for redis.asyncio."""

    sentinels: tuple[redis.asyncio.Redis, ...] = ()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinels:
            await sentinel.aclose()


def _sentinel_kwargs(parsed: SentinelUrl, kwargs: dict[str, Any]) -> dict[str, Any]:
    # A caller's socket timeouts bound the lookups at the sentinels too (``moonq top`` must not hang on one).
    return {**parsed.sentinel_kwargs(), **{k: v for k, v in kwargs.items() if k.startswith("socket_")}}


def sync_redis(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client on ``url`` (any form); ``kwargs`` go to each data-node connection.

    On one Redis or Sentinel the pool is a *blocking* one of ``max_connections`` (default
    ``SYNC_MAX_CONNECTIONS``): past it a command waits up to ``POOL_WAIT_S`` for a free connection,
    where redis-py's default pool fails at once (300 threads replaying their jobs' logs together went
    past its 100). On a Cluster URL a ``redis.cluster.RedisCluster`` (typed as ``redis.Redis``: it
    answers the commands moonq sends; ``is_cluster_client`` tells them apart).
    """
    with_driver_info(kwargs)
    if is_cluster_url(url):
        parsed_cluster = parse_cluster_url(url)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in parsed_cluster.nodes]  # type: ignore[no-untyped-call]
        cluster = redis.cluster.RedisCluster(startup_nodes=nodes, **_cluster_kwargs(parsed_cluster, kwargs))
        return cast(redis.Redis, cluster)
    kwargs.setdefault("max_connections", SYNC_MAX_CONNECTIONS)
    kwargs.setdefault("timeout", POOL_WAIT_S)
    if not is_sentinel_url(url):
        return redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, **kwargs))  # closed with the client
    parsed = parse_sentinel_url(url)
    manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels), sentinel_kwargs=_sentinel_kwargs(parsed, kwargs), **parsed.connection_kwargs()
    )
    kwargs.setdefault("connection_pool_class", BlockingSentinelPool)
    client: _SyncSentinelRedis = manager.master_for(parsed.master, redis_class=_SyncSentinelRedis, **kwargs)  # type: ignore[no-untyped-call]
    client.sentinels = tuple(manager.sentinels)
    return client


def async_redis(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """A redis.asyncio client on ``url`` (any form); ``kwargs`` go to each data-node connection
    (``connection_pool_class`` too, for a Sentinel URL: an ``AsyncSentinelPool``, see moonq/connect.py).

    On a Cluster URL a ``redis.asyncio.cluster.RedisCluster`` (typed as ``redis.asyncio.Redis``, as in
    ``sync_redis``); ``max_connections`` is then a bound per node.
    """
    with_driver_info(kwargs)
    if is_cluster_url(url):
        parsed_cluster = parse_cluster_url(url)
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in parsed_cluster.nodes]
        # ``cluster_class``: a subclass of redis-py's (moonq/connect.py's bounded one).
        cluster_class = kwargs.pop("cluster_class", redis.asyncio.cluster.RedisCluster)
        aio_cluster = cluster_class(startup_nodes=nodes, **_cluster_kwargs(parsed_cluster, kwargs))
        return cast(redis.asyncio.Redis, aio_cluster)
    if not is_sentinel_url(url):
        return redis.asyncio.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels), sentinel_kwargs=_sentinel_kwargs(parsed, kwargs), **parsed.connection_kwargs()
    )
    kwargs.setdefault("connection_pool_class", AsyncSentinelPool)
    client: _AsyncSentinelRedis = manager.master_for(parsed.master, redis_class=_AsyncSentinelRedis, **kwargs)
    client.sentinels = tuple(manager.sentinels)
    return client


@dataclass(frozen=True)
class KombuSentinel:
    """kombu's form of a Sentinel URL: its broker URL, transport options and TLS options."""

    broker_url: str
    transport_options: dict[str, Any]
    use_ssl: dict[str, Any] | None


def kombu_sentinel(url: str) -> KombuSentinel:
    """kombu's Sentinel transport for ``url``: ``sentinel://[user:pass@]h1:26379/db;sentinel://...``
    (each entry carries the data nodes' credentials and db; kombu reads them from the first), and
    the transport options ``master_name`` and ``sentinel_kwargs`` (the sentinels' password and TLS).

    With ``ssl=true`` the TLS options become Celery's ``broker_use_ssl``, verifying the server
    unless the URL says otherwise, as for a ``rediss://`` broker (moonq/broker.py).
    """
    parsed = parse_sentinel_url(url)
    userinfo = ""
    if parsed.username or parsed.password:
        userinfo = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    entries = [
        f"sentinel://{userinfo}{f'[{host}]' if ':' in host else host}:{port}/{parsed.db}"
        for host, port in parsed.sentinels
    ]
    options: dict[str, Any] = {"master_name": parsed.master, "sentinel_kwargs": parsed.sentinel_kwargs()}
    use_ssl: dict[str, Any] | None = None
    if parsed.ssl:
        data = parsed.connection_kwargs()  # parsed as redis-py parses them (ssl_check_hostname a bool)
        use_ssl = {k: data[k] for k in _TLS_PARAMS if k in data}
        reqs = str(use_ssl["ssl_cert_reqs"]).lower()
        use_ssl["ssl_cert_reqs"] = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(reqs, ssl.CERT_REQUIRED)
    return KombuSentinel(";".join(entries), options, use_ssl)
