"""One webhook attempt over HTTP, safe against SSRF: who may be called, and how an answer is read.

A webhook URL is chosen by whoever submits a job, and a node sits inside the fleet's network, so a
node must not become a way to reach what only it can reach (a metadata service, Redis, an admin
port). By default a node calls only ``https`` URLs whose host resolves to public addresses:

- The host is resolved by ``VettingResolver``, the aiohttp connector's own resolver, and the
  connection goes only to the addresses it passed: no second lookup that a DNS answer with a short
  TTL could point elsewhere (DNS rebinding). A name that resolves only to private, loopback,
  link-local, multicast or reserved addresses is refused (``Blocked``); an address given literally
  is checked before anything is sent (aiohttp does not resolve those).
- ``MOONQ_WEBHOOK_ALLOW`` (comma-separated) opens more: a host name (``hooks.internal``, or
  ``.internal`` for every name under it) may resolve anywhere and be called over plain ``http``;
  a CIDR (``10.0.0.0/8``) or an address opens those addresses, and plain ``http`` to them when the
  URL names the address itself.
- Redirects are not followed (a 3xx is a failure, never retried: the URL is wrong); no proxy from
  the environment is used (it would connect on the node's behalf to anything); the answer's body
  is read up to ``MAX_RESPONSE_BYTES``; every attempt has a short total timeout.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

# What is kept of a receiver's answer (for the dead letter's note): the status matters, not the body.
MAX_RESPONSE_BYTES = 4096
USER_AGENT = "moonq-webhooks/1"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Verdict = Literal["delivered", "retry", "give_up"]


class Blocked(OSError):
    """The URL may not be called from a node (SSRF rules above); never retried."""


@dataclass(frozen=True)
class AllowList:
    """``MOONQ_WEBHOOK_ALLOW`` parsed: host names, domain suffixes (``.internal``), networks."""

    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """Comma-separated entries; an address or CIDR is a network, anything else a host name.

        Raises:
            ValueError: an entry that is neither a network nor a plausible host name.
        """
        hosts, suffixes, networks = set(), [], []
        for raw in (part.strip().lower() for part in text.split(",")):
            if not raw:
                continue
            try:
                networks.append(ipaddress.ip_network(raw, strict=False))
                continue
            except ValueError:
                pass
            name = raw.removeprefix("*")
            if not name.strip(".") or any(c in name for c in "/:@ "):
                raise ValueError(f"MOONQ_WEBHOOK_ALLOW: {raw!r} is neither a host name nor an address or CIDR")
            if name.startswith("."):
                suffixes.append(name)
            else:
                hosts.add(name)
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.hosts or any(host.endswith(s) for s in self.suffixes)

    def address_allowed(self, address: Address) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


def is_public(address: Address) -> bool:
    """Globally routable unicast: what a node may call without an allow-list entry."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class VettingResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses a node may connect to for that host."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if self.allow.host_allowed(host):
            return found
        kept = [r for r in found if self._may_connect(r["host"])]
        if not kept:
            raise Blocked(f"{host} resolves only to addresses a node may not call (private, loopback, reserved)")
        return kept

    def _may_connect(self, text: str) -> bool:
        address = _literal(text)
        return address is not None and (is_public(address) or self.allow.address_allowed(address))

    async def close(self) -> None:
        await self._inner.close()


def check_url(url: str, allow: AllowList) -> None:
    """The checks made before connecting: the scheme, and an address given literally.

    Raises:
        Blocked: plain http to a host not allowed, or a literal address a node may not call.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = _literal(host)
    if parts.scheme not in ("https", "http") or not host:
        raise Blocked(f"not an http(s) URL with a host: {parts.scheme}://{host}")
    if literal is not None and not (is_public(literal) or allow.address_allowed(literal)):
        raise Blocked(f"{literal} is not a public address (add it to MOONQ_WEBHOOK_ALLOW to call it)")
    if parts.scheme == "http":
        opened = allow.address_allowed(literal) if literal is not None else allow.host_allowed(host)
        if not opened:
            raise Blocked(f"plain http to {host} (only https, unless MOONQ_WEBHOOK_ALLOW lists the host)")


@dataclass(frozen=True)
class Attempt:
    """How one attempt went: the verdict, a bounded metrics label, the status, a note for people."""

    verdict: Verdict
    label: str  # 2xx, 3xx, 4xx, 408, 429, 5xx, timeout, connection_error, blocked
    status: int | None = None
    note: str = ""
    retry_after_s: float | None = None


def judge(status: int, body: bytes, location: str | None, retry_after: str | None) -> Attempt:
    """An answer's verdict: 2xx delivered; 408, 429 and 5xx retried; 3xx and other 4xx given up."""
    text = body[:200].decode("utf-8", "replace")
    if 200 <= status < 300:
        return Attempt("delivered", "2xx", status)
    if 300 <= status < 400:
        return Attempt("give_up", "3xx", status, f"redirect to {location!r} not followed")
    wait = float(retry_after) if retry_after and retry_after.isdigit() else None
    if status in (408, 429):
        return Attempt("retry", str(status), status, text, wait)
    if 400 <= status < 500:
        return Attempt("give_up", "4xx", status, text)
    return Attempt("retry", "5xx" if status >= 500 else "other", status, text, wait)


class WebhookSender:
    """A node's HTTP client for webhooks: its own pool, the vetting resolver, short timeouts."""

    def __init__(self, allow: AllowList, *, timeout_s: float, max_connections: int) -> None:
        self.allow = allow
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0))
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the loop that uses it
            connector = aiohttp.TCPConnector(
                resolver=VettingResolver(self.allow), limit=self._max_connections, limit_per_host=8
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, trust_env=False, headers={"user-agent": USER_AGENT}
            )
        return self._session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST ``body`` once; never raises for what the receiver or the network did."""
        try:
            check_url(url, self.allow)
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as resp:
                head = await resp.content.read(MAX_RESPONSE_BYTES)
                return judge(resp.status, head, resp.headers.get("location"), resp.headers.get("retry-after"))
        except Blocked as err:
            return Attempt("give_up", "blocked", None, str(err))
        except TimeoutError:
            return Attempt("retry", "timeout", None, f"no answer within {self.timeout.total} s")
        except aiohttp.InvalidURL as err:
            return Attempt("give_up", "blocked", None, f"invalid URL: {err}")
        except (aiohttp.ClientError, OSError) as err:
            if any(isinstance(e, Blocked) for e in _chain(err)):
                return Attempt("give_up", "blocked", None, str(next(e for e in _chain(err) if isinstance(e, Blocked))))
            return Attempt("retry", "connection_error", None, f"{type(err).__name__}: {err}"[:300])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _chain(err: BaseException) -> Iterable[BaseException]:
    """``err``, its causes and contexts, and aiohttp's wrapped ``os_error``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "os_error", None)]
