"""Configuration a producer needs, read from the environment once.

The worker's ``Settings`` (``worker/settings.py``) extends this with what only workers
need (the API key above all). Names follow docs/contract.md: the well-known ``REDIS_URL``,
``CELERY_BROKER_URL`` and ``MOONSHOT_*`` variables keep their names; moonq's own are
``MOONQ_*``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moonq.keys import Keys
from moonq.redisurl import is_cluster_url, is_sentinel_url, parse_cluster_url, parse_sentinel_url
from moonq.wire import DEFAULT_QUEUE

REDIS_SCHEMES = ("redis", "rediss", "unix")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp", "librabbitmq")
# Settings holding a URL that may carry a password (the worker's callback broker too): redacted in repr().
URL_SETTINGS = ("redis_url", "broker_url", "callback_broker_url")
# Query parameters that carry a secret (redis-py passes unknown ones to the connection).
_SECRET_PARAMS = ("password", "pass", "secret", "token", "sentinel_password")


def url_scheme(url: str) -> str:
    """The scheme of a broker or Redis URL, lower case; for ``a+b://`` (kombu's transport+scheme), ``b``."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    return scheme.rpartition("+")[2]


def is_redis_url(url: str) -> bool:
    """A Redis server, or a Sentinel-managed one (``redis+sentinel://``, moonq/redisurl.py), that can be
    the Celery broker: every caller asks it of a broker URL. A Redis Cluster (``redis+cluster://``) is
    not one (kombu has no Cluster transport, and ``ClientSettings`` refuses it as the broker)."""
    return url_scheme(url) in REDIS_SCHEMES or is_sentinel_url(url)


def is_amqp_url(url: str) -> bool:
    return url_scheme(url) in AMQP_SCHEMES


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or the query) replaced by ``***``, for logs and screens.

    Handles kombu's failover lists (``url1;url2``); anything that is not a URL is returned unchanged.
    """
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, qmark, tail = rest.partition("?")
    # The last '@' ends the user info, even when a password holds an unescaped '/' or '@'.
    userinfo, at, location = head.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.partition(':')[0]}:***@{location}"
    query, hash_, fragment = tail.partition("#")
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="/*")
    return f"{scheme}://{head}{qmark}{query}{hash_}{fragment}"


class ClientSettings(BaseSettings):
    """Where the queue lives and how long job records are kept."""

    # hide_input_in_errors: a refused URL (say, a malformed Sentinel URL) must not print its password.
    model_config = SettingsConfigDict(env_prefix="MOONQ_", extra="ignore", frozen=True, hide_input_in_errors=True)

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    # Empty means "the same as redis_url" (filled in below).
    broker_url: str = Field(default="", validation_alias=AliasChoices("CELERY_BROKER_URL", "broker_url"))
    prefix: str = Field(default="moonq", min_length=1)
    queue: str = DEFAULT_QUEUE
    # Job records, results and replay logs expire this long after the job ends.
    result_ttl_s: int = Field(default=24 * 3600, ge=60)
    # The tenants file (moonq/tenants.py, docs/tenants.md); empty: one tenant, "default", without limits.
    tenants_file: str = ""

    @model_validator(mode="after")
    def _default_broker(self) -> ClientSettings:
        if not self.broker_url:
            object.__setattr__(self, "broker_url", self.redis_url)
        for url in (self.redis_url, self.broker_url):
            if is_sentinel_url(url):
                parse_sentinel_url(url)  # a ValueError names the part that is wrong, at startup
            elif is_cluster_url(url):
                parse_cluster_url(url)
            elif url_scheme(url) == "sentinel":
                # kombu's own form lacks the master's name, which moonq derives from its URL form.
                raise ValueError(
                    f"{redact_url(url)}: write a Sentinel URL as redis+sentinel://host1:26379,host2:26379/<master>/<db>"
                )
        # The broker defaults to REDIS_URL, and a worker's callback broker to the broker: a Cluster URL
        # there is refused whichever way it arrived (the worker's Settings adds callback_broker_url).
        for name, variable in (
            ("broker_url", "CELERY_BROKER_URL"),
            ("callback_broker_url", "MOONQ_CALLBACK_BROKER_URL"),
        ):
            if is_cluster_url(getattr(self, name, "")):
                raise ValueError(
                    f"{variable}: the Celery broker cannot be a Redis Cluster (kombu has no cluster transport);"
                    " set it to a plain or redis+sentinel:// Redis, or amqp://"
                )
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # repr() and str() of the settings (tracebacks, debug logs) never show a Redis or broker password.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in URL_SETTINGS and isinstance(value, str) else value
