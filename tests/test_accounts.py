"""The accounts file: keys read once and never shown, every rule named by its field, the default account.

Pure: files in a temporary folder, no servers.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from moonq.configfile import ConfigFileError
from moonq.errors import MoonqError
from worker.accounts import DEFAULT_ACCOUNT, Account, Accounts, UnknownAccount
from worker.ratelimit import Limits
from worker.settings import Settings

MAIN_KEY, SPARE_KEY = "sk-main-0123456789abcdef", "sk-spare-fedcba9876543210"
GOOD: dict[str, Any] = {
    "accounts": {
        "main": {"api_key_file": "k1", "rpm": 500, "tpm": 2000000, "max_inflight": 100},
        "spare": {"api_key": SPARE_KEY, "rpm": 200, "base_url": "https://spare.example.com/v1"},
    }
}


def write(folder: Path, data: Any, name: str = "accounts.json") -> Path:
    """The accounts file in ``folder``, beside ``k1``, the main account's key file."""
    (folder / "k1").write_text(f"\n  {MAIN_KEY}\n\n")
    path = folder / name
    path.write_text(yaml.safe_dump(data) if name.endswith((".yaml", ".yml")) else json.dumps(data))
    return path


def errors_of(folder: Path, data: Any) -> dict[str, str]:
    with pytest.raises(ConfigFileError) as err:
        Accounts.load(write(folder, data))
    assert err.value.setting == "MOONQ_ACCOUNTS_FILE"
    for key in (MAIN_KEY, SPARE_KEY):
        assert key not in str(err.value)
    return dict(err.value.errors)


def key_of(account: Account) -> str | None:
    return account.api_key.get_secret_value() if account.api_key else None


def test_json_and_yaml_load_to_the_same_accounts(tmp_path: Path) -> None:
    from_json = Accounts.load(write(tmp_path, GOOD, "a.json"))
    from_yaml = Accounts.load(write(tmp_path, GOOD, "a.yml"))
    assert list(from_json) == list(from_yaml)
    assert from_json.names == ("main", "spare") and len(from_json) == 2
    main, spare = from_json
    assert key_of(main) == MAIN_KEY and key_of(spare) == SPARE_KEY  # read, stripped
    assert main.limits == Limits(500, 2000000, 100) and main.base_url is None
    assert spare.limits == Limits(200, None, None) and spare.base_url == "https://spare.example.com/v1"
    assert from_json.get("spare") is spare


def test_a_key_file_is_read_once_from_the_accounts_files_folder_or_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # a relative api_key_file is not taken from the working directory
    accounts = Accounts.load(write(tmp_path, GOOD))
    (tmp_path / "k1").write_text("sk-rotated")
    assert key_of(accounts.get("main")) == MAIN_KEY
    absolute = copy.deepcopy(GOOD)
    absolute["accounts"]["main"]["api_key_file"] = str(tmp_path / "k1")
    assert key_of(Accounts.load(write(tmp_path, absolute)).get("main")) == MAIN_KEY


def test_keys_never_leak_through_repr_str_or_json(tmp_path: Path) -> None:
    accounts = Accounts.load(write(tmp_path, GOOD))
    for account in accounts:
        shown = [repr(account), str(account), account.model_dump_json(), json.dumps(account.model_dump(mode="json"))]
        assert all(MAIN_KEY not in text and SPARE_KEY not in text for text in shown)
        assert "**********" in account.model_dump_json()


def mutated(account: str, field: str, value: Any) -> dict[str, Any]:
    """GOOD with one account's ``field`` set to ``value`` (``...``: removed)."""
    data = copy.deepcopy(GOOD)
    if value is ...:
        del data["accounts"][account][field]
    else:
        data["accounts"][account][field] = value
    return data


@pytest.mark.parametrize(
    ("account", "field", "value", "where", "rule"),
    [
        ("main", "rpm", 0, "accounts.main.rpm", "must be >= 1"),
        ("main", "tpm", "2000000", "accounts.main.tpm", "must be an integer"),
        ("main", "max_inflight", 0, "accounts.main.max_inflight", "must be >= 1"),
        ("spare", "base_url", "ftp://spare.example.com", "accounts.spare.base_url", "https://"),
        ("spare", "base_url", "https://", "accounts.spare.base_url", "with a host"),
        ("spare", "base_url", "https://h.example:99999/v1", "accounts.spare.base_url", "is not a URL"),
        ("spare", "base_url", f"https://u:{SPARE_KEY}@h.example/v1", "accounts.spare.base_url", "credentials"),
        ("spare", "api_key", 12345, "accounts.spare.api_key", "must be a string"),
        ("spare", "api_key", ..., "accounts.spare", "needs exactly one of api_key and api_key_file"),
        ("spare", "api_key_file", "k1", "accounts.spare", "needs exactly one of api_key and api_key_file"),
        ("main", "api_key_file", "", "accounts.main.api_key_file", "must not be empty"),
        ("main", "api_kee", "x", "accounts.main.api_kee", "did you mean 'api_key'?"),
    ],
)
def test_each_rule_names_its_field(tmp_path: Path, account: str, field: str, value: Any, where: str, rule: str) -> None:
    errors = errors_of(tmp_path, mutated(account, field, value))
    assert where in errors, errors
    assert rule in errors[where]


@pytest.mark.parametrize(
    ("data", "where", "rule"),
    [
        ({"accounts": {}}, "accounts", "must not be empty"),
        ({}, "accounts", "is required"),
        ({"accounts": {"Main": {"api_key": "k"}}}, "accounts.Main", "the name must be 1 to 64"),
        ({"accounts": {"main": {"api_key": "k"}}, "acounts": {}}, "acounts", "did you mean 'accounts'?"),
    ],
)
def test_the_file_itself(tmp_path: Path, data: Any, where: str, rule: str) -> None:
    errors = errors_of(tmp_path, data)
    assert rule in errors[where], errors


@pytest.mark.parametrize(
    ("content", "rule"),
    [(None, "No such file or directory"), ("  \n\t", "is empty"), (b"\xff\xfe", "is not UTF-8 text")],
)
def test_a_key_file_missing_empty_or_binary_is_named(tmp_path: Path, content: str | bytes | None, rule: str) -> None:
    path = write(tmp_path, GOOD)
    if content is None:
        (tmp_path / "k1").unlink()
    elif isinstance(content, bytes):
        (tmp_path / "k1").write_bytes(content)
    else:
        (tmp_path / "k1").write_text(content)
    with pytest.raises(ConfigFileError) as err:
        Accounts.load(path)
    (field, text), *_ = err.value.errors
    assert field == "accounts.main.api_key_file"
    assert str(tmp_path / "k1") in text and rule in text


def test_an_empty_inline_key_is_refused(tmp_path: Path) -> None:
    assert errors_of(tmp_path, mutated("spare", "api_key", " \n")) == {"accounts.spare.api_key": "is empty"}


def test_two_accounts_with_one_key_name_each_other_without_the_key(tmp_path: Path) -> None:
    data = copy.deepcopy(GOOD)
    data["accounts"]["again"] = {"api_key": f"  {MAIN_KEY} "}
    errors = errors_of(tmp_path, data)
    assert list(errors) == ["accounts.again.api_key"]
    assert errors["accounts.again.api_key"].startswith("is the same key as accounts.main's")


def test_a_secret_in_a_broken_file_is_not_quoted(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text(f"accounts:\n  main:\n    api_key: *{MAIN_KEY}\n")
    with pytest.raises(ConfigFileError, match=re.escape("not valid YAML: line 3")) as err:
        Accounts.load(path)
    assert MAIN_KEY not in str(err.value)


def test_no_file_is_one_default_account_from_the_node_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MOONSHOT_API_KEY",
        "MOONSHOT_API_KEY_FILE",
        "MOONSHOT_BASE_URL",
        "MOONQ_RPM",
        "MOONQ_TPM",
        "MOONQ_MAX_INFLIGHT",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(moonshot_api_key=MAIN_KEY, moonshot_base_url="http://127.0.0.1:9/v1", rpm=60, tpm=9000)
    accounts = Accounts.from_settings(settings)
    (account,) = accounts
    assert accounts.names == (DEFAULT_ACCOUNT,) == ("default",)
    assert key_of(account) == MAIN_KEY and account.base_url == "http://127.0.0.1:9/v1"
    assert account.limits == settings.limits == Limits(60, 9000, None)
    assert MAIN_KEY not in repr(account)
    keyless = Accounts.from_settings(Settings(moonshot_api_key=None)).get("default")
    assert keyless.api_key is None and keyless.limits == Limits()


def test_an_unknown_account_is_a_clear_error(tmp_path: Path) -> None:
    accounts = Accounts.load(write(tmp_path, GOOD))
    with pytest.raises(UnknownAccount, match="unknown account 'default'"):
        accounts.get("default")
    assert issubclass(UnknownAccount, MoonqError) and not issubclass(UnknownAccount, KeyError)
