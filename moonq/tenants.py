"""Tenants: the services sharing one fleet, their gateway tokens, limits, budgets and models.

Several services share one fleet and one upstream quota; each is a tenant, named in the file that
``MOONQ_TENANTS_FILE`` points to (JSON or YAML, docs/tenants.md), with the sha256 of its gateway
bearer tokens and optional limits (``rpm``, ``tpm``, ``max_inflight``), a fair-share ``weight``,
daily budgets, allowed models, the most urgent priority it may ask for, the upstream accounts it
is pinned to and its webhook defaults. Operators' tokens see every tenant. Without a file there is
one tenant, ``default``, with no limits: moonq as it was before tenants.

This module reads the file and answers questions about it; the gateway, the SDK and the nodes
enforce the answers. Python clients are trusted (they hold Redis credentials), so the tenant they
name scopes their jobs; the gateway, which maps a bearer token to its tenant here, is the security
boundary. The file holds only token hashes: a leaked file admits no one.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints, field_validator

from moonq.configfile import ConfigFileError, Name, read_mapping, validate
from moonq.errors import InvalidRequest, MoonqError
from moonq.record import DEFAULT_TENANT
from moonq.webhooks import check_webhook_url, parse_secrets
from moonq.wire import LEAST_URGENT, MOST_URGENT

SETTING = "MOONQ_TENANTS_FILE"
_HEX = frozenset("0123456789abcdef")


def hash_token(token: str) -> str:
    """The sha256 hex digest of a gateway bearer token: what the tenants file holds instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


_EMPTY_TOKEN_HASH = hash_token("")


def _check_hash(value: str) -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise ValueError("must be 64 lowercase hex digits, the sha256 of a token (docs/tenants.md)")
    if value == _EMPTY_TOKEN_HASH:
        raise ValueError("is the sha256 of an empty token")
    return value


TokenHash = Annotated[str, AfterValidator(_check_hash)]
ModelGlob = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Strict(BaseModel):
    # A typo in an ops file must fail loudly, and "3" is not 3: the file says exactly what it means.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Operators(_Strict):
    """Tokens that see and act on every tenant's jobs (the console, ``failed``, ``retry``)."""

    tokens_sha256: list[TokenHash]


class TenantConfig(_Strict):
    """One tenant's entry; every field but ``tokens_sha256`` is optional (None: no limit, no restriction)."""

    # Empty: a tenant only Python clients use (they name it; the gateway admits no one for it).
    tokens_sha256: list[TokenHash]
    # Its share of fleet capacity while several tenants wait for it.
    weight: int = Field(default=1, gt=0)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_inflight: int | None = Field(default=None, gt=0)
    # Per UTC day, from actual usage and the price table.
    daily_tokens: int | None = Field(default=None, gt=0)
    daily_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # fnmatch globs, case-sensitive ("moonshot-v1-*"); None allows every model.
    models: list[ModelGlob] | None = Field(default=None, min_length=1)
    # The most urgent priority it may ask for: 0 allows all, 3 allows 3 to 9.
    max_priority: int = Field(default=MOST_URGENT, ge=MOST_URGENT, le=LEAST_URGENT)
    # Upstream accounts (MOONQ_ACCOUNTS_FILE, on the nodes) its jobs may use; None: any.
    accounts: list[Name] | None = Field(default=None, min_length=1)
    # Where its jobs' webhooks go when a submit names none, and the secrets that sign them.
    webhook_url: str | None = None
    webhook_secrets: SecretStr | None = None

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        try:
            return None if url is None else check_webhook_url(url)
        except InvalidRequest as err:
            raise ValueError("; ".join(rule for _, rule in err.errors)) from None

    @field_validator("webhook_secrets")
    @classmethod
    def _secrets(cls, secrets: SecretStr | None) -> SecretStr | None:
        # parse_secrets' messages never show a secret.
        if secrets is not None and not parse_secrets(secrets.get_secret_value()):
            raise ValueError("must hold at least one whsec_ secret")
        return secrets

    @property
    def webhook_keys(self) -> list[bytes]:
        """The tenant's webhook signing keys, newest first; empty when it has none (the node's apply)."""
        return parse_secrets(self.webhook_secrets.get_secret_value()) if self.webhook_secrets else []

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, glob) for glob in self.models)

    def allows_priority(self, priority: int) -> bool:
        """A priority more urgent (lower) than ``max_priority`` is refused."""
        return priority >= self.max_priority


class TenantsFile(_Strict):
    """The file's shape."""

    operators: Operators = Field(default_factory=lambda: Operators(tokens_sha256=[]))
    tenants: dict[Name, TenantConfig] = Field(min_length=1)


@dataclass(frozen=True)
class Principal:
    """Whom a gateway bearer token speaks for.

    Attributes:
        tenant: the tenant its submits go to and whose jobs it sees; None for an operator from the file.
        operator: it sees and acts on every tenant's jobs.
    """

    tenant: str | None
    operator: bool = False

    def may_see(self, tenant: str) -> bool:
        """Whether a job of ``tenant`` is visible to this token (else it answers as an unknown id)."""
        return self.operator or self.tenant == tenant


class UnknownTenant(MoonqError, LookupError):
    """A tenant name that the tenants file does not configure."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown tenant {name[:64]!r}: not configured in {SETTING}")


class Tenants:
    """The configured tenants, and the gateway's lookup from bearer token to ``Principal``.

    Build one with ``load`` (a file), ``default`` (no file) or ``cached_tenants`` (once per process).
    """

    def __init__(self, tenants: Mapping[str, TenantConfig], principals: Mapping[str, Principal]) -> None:
        self._tenants = dict(tenants)
        self._principals = [(bytes.fromhex(digest), who) for digest, who in principals.items()]

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The tenants of a JSON or YAML tenants file.

        Raises:
            ConfigFileError: naming every field that breaks a rule, and each hash found twice.
        """
        config = validate(TenantsFile, read_mapping(path, SETTING), SETTING, path)
        duplicates = _duplicate_hashes(config)
        if duplicates:
            raise ConfigFileError(SETTING, path, duplicates)
        principals = {digest: Principal(None, operator=True) for digest in config.operators.tokens_sha256}
        for name, tenant in config.tenants.items():
            principals |= {digest: Principal(name) for digest in tenant.tokens_sha256}
        return cls(config.tenants, principals)

    @classmethod
    def default(cls, gateway_tokens: Iterable[str] = ()) -> Self:
        """No file: one tenant, ``default``, without limits; each gateway token may do everything, as before."""
        principals = {hash_token(token): Principal(DEFAULT_TENANT, operator=True) for token in gateway_tokens}
        return cls({DEFAULT_TENANT: TenantConfig(tokens_sha256=[])}, principals)

    @property
    def names(self) -> tuple[str, ...]:
        """The configured tenant names, sorted: the only values of the metrics' ``tenant`` label."""
        return tuple(sorted(self._tenants))

    def __contains__(self, name: object) -> bool:
        return name in self._tenants

    def get(self, name: str) -> TenantConfig:
        """The configuration of the tenant ``name``.

        Raises:
            UnknownTenant: ``name`` is not configured.
        """
        try:
            return self._tenants[name]
        except KeyError:
            raise UnknownTenant(name) from None

    def by_token(self, token: str) -> Principal | None:
        """Whom a bearer token speaks for; None for a token the file does not know.

        The token's hash is compared with every configured hash, in constant time and without
        stopping at a match, so the time taken tells nothing about which hash or whether one matched.
        """
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, who in self._principals:
            if hmac.compare_digest(digest, known):
                found = who
        return found

    def token_hashes(self) -> dict[str, Principal]:
        """Every admitted token's sha256 (hex) and whom it speaks for: the web console fingerprints them."""
        return {known.hex(): who for known, who in self._principals}


def _duplicate_hashes(config: TenantsFile) -> list[tuple[str, str]]:
    """``(field, rule)`` for each hash listed again, in the same or another entry: one token, one principal."""
    owners: dict[str, str] = {}
    found = []
    entries: list[tuple[str, Operators | TenantConfig]] = [("operators", config.operators)]
    entries += [(f"tenants.{name}", tenant) for name, tenant in config.tenants.items()]
    for where, entry in entries:
        for n, digest in enumerate(entry.tokens_sha256):
            field = f"{where}.tokens_sha256[{n}]"
            if digest in owners:
                found.append((field, f"hash {digest[:12]}… is also in {owners[digest]}"))
            else:
                owners[digest] = field
    return found


@functools.cache
def cached_tenants(path: str) -> Tenants:
    """The tenants of ``path`` (``ClientSettings.tenants_file``), read once per process; ``""``: the default.

    A file that fails to load is not cached: the error repeats, naming the problem, on every call.
    """
    return Tenants.load(path) if path else Tenants.default()
