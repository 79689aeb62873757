"""Redis Cluster: the ``redis+cluster://`` URL, and the clients built on it against a real cluster.

Three primaries on free ports (harness ``ClusterSet``, one for the module): the sync and asyncio
clients of ``sync_redis``/``async_redis`` and ``resilient_redis`` write keys that land on every
shard, run a Lua script whose keys share a hash tag, and a sharded pub/sub message makes the round
trip through redis-py's asyncio ``ClusterPubSub``. The Celery broker cannot be a cluster (kombu
has no Cluster transport): the settings refuse one.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from harness.processes import ClusterSet
from moonq.connect import resilient_redis
from moonq.redisurl import (
    ClusterUrl,
    async_redis,
    is_cluster_client,
    is_cluster_url,
    parse_cluster_url,
    sync_redis,
)
from moonq.settings import ClientSettings, is_redis_url, redact_url
from tests.helpers import make_settings

# Both keys in one slot (the hash tag), as every multi-key script of moonq's must have them.
TWO_KEYS_LUA = (
    "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return redis.call('GET', KEYS[2])"
)
BROKER_REFUSED = "the Celery broker cannot be a Redis Cluster (kombu has no cluster transport)"


# ---- (a) the URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+cluster://h1:7000,h2:7001/", ClusterUrl(nodes=(("h1", 7000), ("h2", 7001)))),
        # The port defaults to 6379; no path, /0 and a trailing slash all mean db 0; the scheme is case-insensitive.
        ("REDIS+CLUSTER://h1,h2:7", ClusterUrl(nodes=(("h1", 6379), ("h2", 7)))),
        ("redis+cluster://h1/0", ClusterUrl(nodes=(("h1", 6379),))),
        ("redis+cluster://h1:1/0/?db=0", ClusterUrl(nodes=(("h1", 1),))),
        (
            "redis+cluster://app:p%40ss%2Fw@h1:1/?socket_timeout=2",
            ClusterUrl(nodes=(("h1", 1),), username="app", password="p@ss/w", params=(("socket_timeout", "2"),)),
        ),
        # A password only (the default user), an unescaped '@' in it, IPv6 nodes.
        (
            "redis+cluster://:p@w@[::1]:7000,[fe80::2]/",
            ClusterUrl(nodes=(("::1", 7000), ("fe80::2", 6379)), password="p@w"),
        ),
        (
            "redis+cluster://h1:7000/?ssl=true&ssl_ca_certs=/ca.pem",
            ClusterUrl(nodes=(("h1", 7000),), ssl=True, params=(("ssl_ca_certs", "/ca.pem"),)),
        ),
    ],
)
def test_every_form_of_the_cluster_url_parses(url: str, expected: ClusterUrl) -> None:
    assert parse_cluster_url(url) == expected
    assert is_cluster_url(url)
    # Not a broker kombu can use: every caller of is_redis_url asks it of the broker URL.
    assert not is_redis_url(url)


def test_the_url_becomes_redis_cluster_arguments() -> None:
    kwargs = parse_cluster_url(
        "redis+cluster://u:pw@h1:7000/?ssl=yes&ssl_check_hostname=false&socket_timeout=2.5"
    ).connection_kwargs()
    assert kwargs == {
        "username": "u",
        "password": "pw",
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
        "socket_timeout": 2.5,
    }


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis://h1:7000/", "the scheme must be redis+cluster://"),
        ("redis+cluster:///", "a node address is empty"),
        ("redis+cluster://h1,,h2/", "a node address is empty"),
        ("redis+cluster://h1:port/", "node 'h1' has port 'port'"),
        ("redis+cluster://h1:70000/", "node 'h1' has port '70000'"),
        ("redis+cluster://:7000/", "node address ':7000' has no host"),
        ("redis+cluster://[::1/", "is not [ipv6]:port"),
        ("redis+cluster://h1/3", "Redis Cluster has only db 0, not /3"),
        ("redis+cluster://h1/mymaster/0", "Redis Cluster has only db 0, not /mymaster/0"),
        ("redis+cluster://h1/?db=2", "Redis Cluster has only db 0, not db=2"),
        ("redis+cluster://h1/?ssl=maybe", "ssl must be true or false, not 'maybe'"),
        ("redis+cluster://h1/?socket_timeout=soon", "'socket_timeout'"),
    ],
)
def test_a_wrong_cluster_url_is_refused_naming_the_wrong_part(url: str, names: str) -> None:
    with pytest.raises(ValueError, match="Cluster URL") as err:
        parse_cluster_url(url)
    assert names in str(err.value)


def test_a_cluster_urls_password_is_never_shown() -> None:
    url = "redis+cluster://app:hunter2@h1:7000,h2:7001/?password=sekrit"
    assert redact_url(url) == "redis+cluster://app:***@h1:7000,h2:7001/?password=***"
    settings = ClientSettings(redis_url=url, broker_url="redis://:brokerpw@b:6379/0")
    assert "hunter2" not in repr(settings) and "sekrit" not in repr(settings) and "brokerpw" not in repr(settings)
    with pytest.raises(ValueError, match="node 'h1' has port") as err:
        ClientSettings(redis_url="redis+cluster://app:hunter2@h1:x/", broker_url="redis://b")
    assert "hunter2" not in str(err.value)


# ---- (b) the broker cannot be a cluster ----------------------------------------------------------


def test_the_settings_refuse_a_cluster_as_the_broker() -> None:
    cluster = "redis+cluster://h1:7000,h2:7001/"
    # Left out, the broker would be REDIS_URL's cluster.
    with pytest.raises(ValueError, match=re.escape(f"CELERY_BROKER_URL: {BROKER_REFUSED}")):
        ClientSettings(redis_url=cluster)
    with pytest.raises(ValueError, match=re.escape(f"CELERY_BROKER_URL: {BROKER_REFUSED}")):
        ClientSettings(redis_url="redis://h/0", broker_url=cluster)
    with pytest.raises(ValueError, match=r"set it to a plain or redis\+sentinel:// Redis, or amqp://"):
        ClientSettings(broker_url=cluster)
    # The data plane on the cluster, the broker elsewhere: accepted, and the callbacks follow the broker.
    for broker in ("redis://b:6379/0", "redis+sentinel://s1,s2/m/0", "amqp://guest:guest@rabbit//"):
        assert ClientSettings(redis_url=cluster, broker_url=broker).broker_url == broker
    assert make_settings(cluster, broker_url="redis://b/0").callback_broker_url == ""
    with pytest.raises(ValueError, match=re.escape(f"MOONQ_CALLBACK_BROKER_URL: {BROKER_REFUSED}")):
        make_settings(cluster, broker_url="redis://b/0", callback_broker_url=cluster)


# ---- (c) a real cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    with ClusterSet() as started:
        yield started


def _keys_per_node(cluster: ClusterSet, pattern: str) -> list[int]:
    counts = []
    for port in cluster.ports:
        with redis.Redis(port=port) as node:
            counts.append(len(node.keys(pattern)))
    return counts


def test_the_sync_client_spreads_keys_over_every_shard_and_runs_a_hash_tagged_script(cluster: ClusterSet) -> None:
    run = uuid.uuid4().hex
    client = sync_redis(cluster.url, socket_timeout=2.0, connection_pool_class=redis.BlockingConnectionPool)
    try:
        assert is_cluster_client(client) and isinstance(client, redis.cluster.RedisCluster)
        for i in range(60):
            client.set(f"{run}:{i}", i)
        assert [client.get(f"{run}:{i}") for i in range(60)] == [str(i).encode() for i in range(60)]
        # The caller's connection options reach every node's connections (the pool class was dropped).
        for node in client.get_nodes():
            pool = node.redis_connection.connection_pool
            assert pool.connection_kwargs["socket_timeout"] == 2.0 and type(pool) is redis.ConnectionPool
        assert all(_keys_per_node(cluster, f"{run}:*")), "60 keys all on fewer than three shards"
        script = client.register_script(TWO_KEYS_LUA)
        assert script(keys=[f"moonq:{{{run}}}:a", f"moonq:{{{run}}}:b"], args=["v"]) == b"v"
        # Keys without a common hash tag are refused before they reach a node, not silently split.
        with pytest.raises(RedisClusterException, match="all keys must map to the same key slot"):
            script(keys=[f"{run}:a", f"{run}:b"], args=["v"])
    finally:
        client.close()
    assert not is_cluster_client(redis.Redis())


def test_the_async_client_spreads_keys_over_every_shard_and_runs_a_hash_tagged_script(cluster: ClusterSet) -> None:
    run = uuid.uuid4().hex

    async def main() -> Any:
        client = async_redis(cluster.url, socket_timeout=2.0, connection_pool_class=redis.asyncio.ConnectionPool)
        try:
            assert is_cluster_client(client) and isinstance(client, redis.asyncio.cluster.RedisCluster)
            # redis-py's own client must be initialized before many first commands at once (they raced,
            # dropping each other's connections); moonq's nodes use GatedRedisCluster, which does it.
            await client.initialize()
            await asyncio.gather(*(client.set(f"{run}:{i}", i) for i in range(60)))
            values = await asyncio.gather(*(client.get(f"{run}:{i}") for i in range(60)))
            assert {node.connection_kwargs["socket_timeout"] for node in client.get_nodes()} == {2.0}
            script = client.register_script(TWO_KEYS_LUA)
            return values, await script(keys=[f"moonq:{{{run}}}:a", f"moonq:{{{run}}}:b"], args=["w"])
        finally:
            await client.aclose()

    values, answer = asyncio.run(main())
    assert values == [str(i).encode() for i in range(60)] and answer == b"w"
    assert all(_keys_per_node(cluster, f"{run}:*"))


def test_resilient_redis_on_a_cluster_is_bounded_per_node(cluster: ClusterSet) -> None:
    run = uuid.uuid4().hex

    async def main() -> Any:
        client = resilient_redis(cluster.url, max_connections=3, health_check_interval=30, socket_keepalive=True)
        try:
            assert isinstance(client, redis.asyncio.cluster.RedisCluster)
            await client.set(f"moonq:{{{run}}}:x", "1")
            script = client.register_script(TWO_KEYS_LUA)
            answer = await script(keys=[f"moonq:{{{run}}}:a", f"moonq:{{{run}}}:b"], args=["r"])
            nodes = client.get_nodes()
            return answer, await client.get(f"moonq:{{{run}}}:x"), len(nodes), {n.max_connections for n in nodes}
        finally:
            await client.aclose()

    answer, value, nodes, bounds = asyncio.run(main())
    assert (answer, value, nodes, bounds) == (b"r", b"1", 3, {3})


def test_a_sharded_message_round_trips_through_the_async_cluster_pubsub(cluster: ClusterSet) -> None:
    channel = "moonq:events:{562}:x"
    publisher = sync_redis(cluster.url)

    async def main() -> list[dict[str, Any]]:
        client = async_redis(cluster.url)
        pubsub = client.pubsub()
        try:
            assert isinstance(pubsub, redis.asyncio.cluster.ClusterPubSub)
            # redis-py 8.1 loads the slot map at a client's first command; ssubscribe looks the channel's
            # node up in it without loading it, so on a client that has sent nothing yet it fails.
            with pytest.raises(SlotNotCoveredError):
                await pubsub.ssubscribe(channel)
            await client.initialize()
            await pubsub.ssubscribe(channel)
            got: list[dict[str, Any]] = []
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not any(m["type"] == "smessage" for m in got):
                message = await pubsub.get_sharded_message(timeout=0.5)
                if message is None:
                    continue
                got.append(message)
                if message["type"] == "ssubscribe":
                    # The subscription is in place on the channel's shard: a publish now is received.
                    assert publisher.spublish(channel, "hello") == 1
            return got
        finally:
            await pubsub.aclose()
            await client.aclose()

    try:
        got = asyncio.run(main())
    finally:
        publisher.close()
    assert [(m["type"], m["channel"], m["data"]) for m in got] == [
        ("ssubscribe", channel.encode(), 1),
        ("smessage", channel.encode(), b"hello"),
    ]


def test_cluster_pipelines_refuse_a_script_object_but_take_a_raw_evalsha(cluster: ClusterSet) -> None:
    """redis-py 8.1 blocks ``evalsha`` (so ``Script(..., client=pipe)``) in both cluster pipelines;
    the command itself, sent by name, runs (its keys pick the node)."""
    run = uuid.uuid4().hex
    keys = [f"moonq:{{{run}}}:a", f"moonq:{{{run}}}:b"]
    client = sync_redis(cluster.url)
    try:
        script = client.register_script(TWO_KEYS_LUA)
        script(keys=keys, args=["loaded"])  # loaded on the keys' node
        pipe = client.pipeline(transaction=False)
        with pytest.raises(RedisClusterException, match="evalsha is blocked"):
            script(keys=keys, args=["s"], client=pipe)
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", script.sha, 2, *keys, "s")
        assert pipe.execute() == [b"s"]
    finally:
        client.close()

    async def main() -> Any:
        aclient = async_redis(cluster.url)
        try:
            ascript = aclient.register_script(TWO_KEYS_LUA)
            apipe = aclient.pipeline(transaction=False)
            with pytest.raises(RedisClusterException, match="evalsha is blocked"):
                await ascript(keys=keys, args=["a"], client=apipe)
            apipe = aclient.pipeline(transaction=False)
            apipe.execute_command("EVALSHA", ascript.sha, 2, *keys, "a")
            return await apipe.execute()
        finally:
            await aclient.aclose()

    assert asyncio.run(main()) == [b"a"]
