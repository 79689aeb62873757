"""The node's upstream accounts: a pool of API keys, each with its own fleet-wide limits.

One API key is one upstream quota (docs/moonshot-api.md §8 meters each account on its own), so a
fleet with several keys runs each as an account, named in the file ``MOONQ_ACCOUNTS_FILE`` points to
(JSON or YAML, docs/tenants.md): the key inline (``api_key``) or in a file (``api_key_file``, a
mounted secret), optional ``rpm``, ``tpm``, ``max_inflight`` and ``base_url``. Without a file the node
has one account, ``default``, made of its settings (``MOONSHOT_API_KEY``, ``MOONSHOT_BASE_URL``,
``MOONQ_RPM``...), as before accounts.

Keys stay on the workers: they are read here once, held as ``SecretStr`` (repr, str and JSON show
``**********``), and no error message shows one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from moonq.configfile import ConfigFileError, Name, read_mapping, validate
from worker.errors import UnknownAccount
from worker.ratelimit import DEFAULT_ACCOUNT, Limits
from worker.settings import Settings

SETTING = "MOONQ_ACCOUNTS_FILE"
__all__ = ["DEFAULT_ACCOUNT", "SETTING", "Account", "AccountEntry", "Accounts", "AccountsFile", "UnknownAccount"]


class _Caps(BaseModel):
    # A typo in an ops file must fail loudly, and "500" is not 500.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_inflight: int | None = Field(default=None, ge=1)
    # None: the node's MOONSHOT_BASE_URL.
    base_url: str | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
            except ValueError:
                raise ValueError("is not a URL") from None
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError("must be an https:// (or http://) URL with a host")
            if parts.username or parts.password:
                raise ValueError("must not hold credentials (the key goes in api_key or api_key_file)")
        return url

    @property
    def limits(self) -> Limits:
        """This account's fleet-wide limits (None on an axis: no limit)."""
        return Limits(self.rpm, self.tpm, self.max_inflight)


class AccountEntry(_Caps):
    """One account as the file writes it: exactly one of ``api_key`` and ``api_key_file``."""

    api_key: SecretStr | None = None
    # Read once at load; a relative path is taken from the accounts file's folder.
    api_key_file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        if (self.api_key is None) == (self.api_key_file is None):
            raise ValueError("needs exactly one of api_key and api_key_file")
        return self


class AccountsFile(BaseModel):
    """The file's shape."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    accounts: dict[Name, AccountEntry] = Field(min_length=1)


class Account(_Caps):
    """One upstream account, ready to call: its key (None: the upstream wants none), URL and limits."""

    name: Name
    api_key: SecretStr | None = None


class Accounts:
    """The node's accounts, in the file's order; iterate, or ``get`` one by name."""

    def __init__(self, accounts: Iterable[Account]) -> None:
        self._accounts = {account.name: account for account in accounts}

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The accounts of a JSON or YAML accounts file, each key read (from its file, if so) and stripped.

        Raises:
            ConfigFileError: a field breaks a rule, a key file cannot be read or is empty, or two
                accounts hold the same key. The message names the account and field, never a key.
        """
        config = validate(AccountsFile, read_mapping(path, SETTING), SETTING, path)
        folder = Path(path).parent
        accounts: list[Account] = []
        errors: list[tuple[str, str]] = []
        owners: dict[bytes, str] = {}  # sha256 of each key: two accounts must not share one
        for name, entry in config.accounts.items():
            field = f"accounts.{name}.{'api_key' if entry.api_key is not None else 'api_key_file'}"
            key, problem = _read_key(entry, folder)
            digest = hashlib.sha256(key.encode()).digest()
            if not problem and digest in owners:
                problem = f"is the same key as {owners[digest]}'s: one key is one quota, so one account"
            if problem:
                errors.append((field, problem))
                continue
            owners[digest] = f"accounts.{name}"
            caps = entry.model_dump(include={"rpm", "tpm", "max_inflight", "base_url"})
            accounts.append(Account(name=name, api_key=SecretStr(key), **caps))
        if errors:
            raise ConfigFileError(SETTING, path, errors)
        return cls(accounts)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """No file: one account, ``default``, of the node's key, base URL and limits."""
        account = Account(
            name=DEFAULT_ACCOUNT,
            api_key=settings.moonshot_api_key,
            base_url=settings.moonshot_base_url,
            rpm=settings.rpm,
            tpm=settings.tpm,
            max_inflight=settings.max_inflight,
        )
        return cls([account])

    @property
    def names(self) -> tuple[str, ...]:
        """The account names, in order: the only values of the metrics' ``account`` label."""
        return tuple(self._accounts)

    def __iter__(self) -> Iterator[Account]:
        return iter(self._accounts.values())

    def __len__(self) -> int:
        return len(self._accounts)

    def get(self, name: str) -> Account:
        """The account ``name``.

        Raises:
            UnknownAccount: the node has no such account.
        """
        try:
            return self._accounts[name]
        except KeyError:
            raise UnknownAccount(name) from None


def _read_key(entry: AccountEntry, folder: Path) -> tuple[str, str]:
    """``(key, "")``, or ``("", problem)``: the problem names the file, never what it holds."""
    if entry.api_key is not None:
        key = entry.api_key.get_secret_value().strip()
        return (key, "") if key else ("", "is empty")
    path = folder / str(entry.api_key_file)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        return "", f"cannot read {path}: {err.strerror}"
    except UnicodeDecodeError:
        return "", f"{path} is not UTF-8 text"
    return (key, "") if key else ("", f"{path} is empty")


def load_accounts(settings: Settings) -> Accounts:
    """The node's accounts: ``MOONQ_ACCOUNTS_FILE``'s, or one of its own settings when there is none.

    Raises:
        ConfigFileError: the file breaks a rule (the message names the account and the field).
    """
    return Accounts.load(settings.accounts_file) if settings.accounts_file else Accounts.from_settings(settings)
