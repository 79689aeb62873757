"""The tenants file: JSON or YAML to the same tenants, every rule named by its field, and the token lookup.

Pure: files in a temporary folder, no servers.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from moonq.configfile import ConfigFileError, validate
from moonq.errors import MoonqError
from moonq.record import DEFAULT_TENANT
from moonq.settings import ClientSettings
from moonq.tenants import (
    Principal,
    TenantConfig,
    Tenants,
    UnknownTenant,
    cached_tenants,
    hash_token,
)
from worker.accounts import AccountsFile

SEARCH_TOKEN, REPORTS_TOKEN, OPS_TOKEN = "tok-search", "tok-reports", "tok-ops"
SECRET = "whsec_" + "c2VjcmV0LWJ5dGVzLWZvci10ZXN0aW5nLW9ubHkh"  # 30 bytes once decoded
GOOD: dict[str, Any] = {
    "operators": {"tokens_sha256": [hash_token(OPS_TOKEN)]},
    "tenants": {
        "search": {
            "tokens_sha256": [hash_token(SEARCH_TOKEN), hash_token("tok-search-2")],
            "weight": 3,
            "rpm": 300,
            "tpm": 200000,
            "max_inflight": 50,
            "daily_tokens": 5000000,
            "daily_usd": 50.0,
            "models": ["kimi-k2.5", "moonshot-v1-*"],
            "max_priority": 3,
            "accounts": ["main"],
            "webhook_url": "https://hooks.example.com/moonq",
            "webhook_secrets": SECRET,
        },
        "reports": {"tokens_sha256": [hash_token(REPORTS_TOKEN)], "weight": 1},
    },
}


def write(folder: Path, data: Any, name: str = "tenants.json") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data) if name.endswith((".yaml", ".yml")) else json.dumps(data))
    return path


def errors_of(folder: Path, data: Any) -> dict[str, str]:
    with pytest.raises(ConfigFileError) as err:
        Tenants.load(write(folder, data))
    assert err.value.setting == "MOONQ_TENANTS_FILE"
    return dict(err.value.errors)


def test_json_and_yaml_load_to_the_same_tenants(tmp_path: Path) -> None:
    from_json = Tenants.load(write(tmp_path, GOOD, "t.json"))
    from_yaml = Tenants.load(write(tmp_path, GOOD, "t.yaml"))
    from_yml = Tenants.load(write(tmp_path, GOOD, "t.yml"))
    for tenants in (from_yaml, from_yml):
        assert tenants.names == from_json.names == ("reports", "search")
        assert all(tenants.get(name) == from_json.get(name) for name in from_json.names)
    search = from_yaml.get("search")
    assert (search.weight, search.rpm, search.tpm, search.max_inflight) == (3, 300, 200000, 50)
    assert (search.daily_tokens, search.daily_usd, search.accounts) == (5000000, 50.0, ["main"])
    assert len(search.webhook_keys) == 1
    # Every other field at its default: no limit, no budget, every model and priority, no webhook.
    assert from_yaml.get("reports") == TenantConfig(tokens_sha256=[hash_token(REPORTS_TOKEN)])
    assert from_yaml.get("reports").webhook_keys == []


def test_yaml_anchors_share_settings_and_a_key_beside_a_merge_overrides_it(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("tenants:\n  a: &base {tokens_sha256: [], weight: 2, rpm: 100}\n  b:\n    <<: *base\n    rpm: 50\n")
    tenants = Tenants.load(path)
    assert (tenants.get("a").weight, tenants.get("a").rpm) == (2, 100)
    assert (tenants.get("b").weight, tenants.get("b").rpm) == (2, 50)


def test_an_other_extension_is_tried_as_json_then_as_yaml(tmp_path: Path) -> None:
    as_json = tmp_path / "tenants.conf"
    as_json.write_text(json.dumps(GOOD))
    as_yaml = tmp_path / "tenants"
    as_yaml.write_text(yaml.safe_dump(GOOD))
    assert Tenants.load(as_json).names == Tenants.load(as_yaml).names == ("reports", "search")


def mutated(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """GOOD with the field at ``path`` set to ``value`` (``...``: removed)."""
    data = copy.deepcopy(GOOD)
    *parents, last = path
    target = data
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


SEARCH = ("tenants", "search")


@pytest.mark.parametrize(
    ("path", "value", "field", "rule"),
    [
        ((*SEARCH, "weight"), 0, "tenants.search.weight", "must be > 0"),
        ((*SEARCH, "weight"), "3", "tenants.search.weight", "must be an integer"),
        ((*SEARCH, "weight"), 1.5, "tenants.search.weight", "must be an integer"),
        ((*SEARCH, "rpm"), -1, "tenants.search.rpm", "must be > 0"),
        ((*SEARCH, "tpm"), 0, "tenants.search.tpm", "must be > 0"),
        ((*SEARCH, "max_inflight"), 0, "tenants.search.max_inflight", "must be > 0"),
        ((*SEARCH, "daily_tokens"), 0, "tenants.search.daily_tokens", "must be > 0"),
        ((*SEARCH, "daily_usd"), 0, "tenants.search.daily_usd", "must be > 0"),
        ((*SEARCH, "daily_usd"), float("inf"), "tenants.search.daily_usd", "must be a finite number"),
        ((*SEARCH, "models"), [], "tenants.search.models", "must not be empty"),
        ((*SEARCH, "models"), "kimi-*", "tenants.search.models", "must be a list"),
        ((*SEARCH, "models"), ["kimi", ""], "tenants.search.models[1]", "must not be empty"),
        ((*SEARCH, "max_priority"), 10, "tenants.search.max_priority", "must be <= 9"),
        ((*SEARCH, "max_priority"), -1, "tenants.search.max_priority", "must be >= 0"),
        ((*SEARCH, "max_priority"), True, "tenants.search.max_priority", "must be an integer"),
        ((*SEARCH, "accounts"), ["Main"], "tenants.search.accounts[0]", "1 to 64 characters, each a-z"),
        ((*SEARCH, "webhook_url"), "ftp://x", "tenants.search.webhook_url", "https://"),
        ((*SEARCH, "webhook_url"), "https://u:p@h.example", "tenants.search.webhook_url", "credentials"),
        ((*SEARCH, "webhook_secrets"), " , ", "tenants.search.webhook_secrets", "at least one whsec_"),
        ((*SEARCH, "webhook_secrets"), "whsec_", "tenants.search.webhook_secrets", "secret 1 is 0 bytes"),
        ((*SEARCH, "webhook_secrets"), "sk-not-a-whsec", "tenants.search.webhook_secrets", "secret 1 does not"),
        ((*SEARCH, "tokens_sha256"), ..., "tenants.search.tokens_sha256", "is required"),
        ((*SEARCH, "tokens_sha256"), ["ABCD" * 16], "tenants.search.tokens_sha256[0]", "64 lowercase hex"),
        ((*SEARCH, "tokens_sha256"), ["ab" * 31], "tenants.search.tokens_sha256[0]", "64 lowercase hex"),
        ((*SEARCH, "tokens_sha256"), [hash_token("")], "tenants.search.tokens_sha256[0]", "empty token"),
        ((*SEARCH, "wieght"), 3, "tenants.search.wieght", "did you mean 'weight'?"),
        (("operators", "tokens_sha256"), ["nope"], "operators.tokens_sha256[0]", "64 lowercase hex"),
        (("operators", "token_sha256"), [], "operators.token_sha256", "did you mean 'tokens_sha256'?"),
        (("tenants",), {}, "tenants", "must not be empty"),
        (("tenants",), ..., "tenants", "is required"),
        (("tenant",), {}, "tenant", "did you mean 'tenants'?"),
        (("tenants", "Search"), {"tokens_sha256": []}, "tenants.Search", "the name must be 1 to 64"),
        (("tenants", "a b"), {"tokens_sha256": []}, 'tenants["a b"]', "the name must be 1 to 64"),
        (("tenants", "x" * 65), {"tokens_sha256": []}, "tenants." + "x" * 65, "the name must be 1 to 64"),
        (("tenants", "reports"), [], "tenants.reports", "must be an object"),
    ],
)
def test_each_rule_names_its_field(tmp_path: Path, path: tuple[str, ...], value: Any, field: str, rule: str) -> None:
    errors = errors_of(tmp_path, mutated(path, value))
    assert field in errors, errors
    assert rule in errors[field]


def test_every_problem_is_reported_at_once_with_the_file_and_the_setting(tmp_path: Path) -> None:
    data = mutated((*SEARCH, "weight"), 0)
    data["tenants"]["reports"]["rpm"] = 0
    path = write(tmp_path, data)
    with pytest.raises(ConfigFileError) as err:
        Tenants.load(path)
    assert isinstance(err.value, MoonqError) and isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"MOONQ_TENANTS_FILE {path}: ")
    assert "tenants.search.weight: must be > 0" in str(err.value)
    assert "tenants.reports.rpm: must be > 0" in str(err.value)


def test_a_webhook_secret_is_never_shown(tmp_path: Path) -> None:
    bad = SECRET + "," + "whsec_" + "c2hvcnQ="  # the second one decodes to 5 bytes: too short
    text = str(errors_of(tmp_path, mutated((*SEARCH, "webhook_secrets"), bad)))
    assert "secret 2 is 5 bytes" in text
    assert SECRET[6:] not in text and "c2hvcnQ" not in text
    search = Tenants.load(write(tmp_path, GOOD)).get("search")
    assert SECRET[6:] not in repr(search) and SECRET[6:] not in str(search)
    assert SECRET[6:] not in search.model_dump_json()


@pytest.mark.parametrize(
    ("second", "field", "names"),
    [
        (("tenants", "reports"), "tenants.reports.tokens_sha256[1]", "tenants.search.tokens_sha256[0]"),
        # The operators are read first: the tenant's copy is the one found again.
        (("operators",), "tenants.search.tokens_sha256[0]", "operators.tokens_sha256[1]"),
        (("tenants", "search"), "tenants.search.tokens_sha256[2]", "tenants.search.tokens_sha256[0]"),
    ],
)
def test_a_hash_listed_twice_names_both_places(tmp_path: Path, second: tuple[str, ...], field: str, names: str) -> None:
    data = copy.deepcopy(GOOD)
    target = data
    for key in second:
        target = target[key]
    target["tokens_sha256"].append(hash_token(SEARCH_TOKEN))
    errors = errors_of(tmp_path, data)
    assert errors == {field: f"hash {hash_token(SEARCH_TOKEN)[:12]}… is also in {names}"}


def test_by_token_finds_the_tenant_or_the_operator_or_nobody(tmp_path: Path) -> None:
    tenants = Tenants.load(write(tmp_path, GOOD))
    assert tenants.by_token(SEARCH_TOKEN) == tenants.by_token("tok-search-2") == Principal("search")
    assert tenants.by_token(REPORTS_TOKEN) == Principal("reports")
    operator = tenants.by_token(OPS_TOKEN)
    assert operator == Principal(None, operator=True)
    assert operator.may_see("search") and operator.may_see("reports")
    search = tenants.by_token(SEARCH_TOKEN)
    assert search is not None and search.may_see("search") and not search.may_see("reports")
    for unknown in ("", "tok-search ", hash_token(SEARCH_TOKEN), "tok-\x00"):
        assert tenants.by_token(unknown) is None


def test_by_token_compares_every_hash_whatever_it_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first hash, the last and none at all cost the same comparisons."""
    tenants = Tenants.load(write(tmp_path, GOOD))
    compared: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    counts = []
    for token in (OPS_TOKEN, REPORTS_TOKEN, "nobody"):
        compared.clear()
        tenants.by_token(token)
        counts.append(len(compared))
        assert set(compared) == {32}  # whole digests, never a prefix
    assert counts == [4, 4, 4]


def test_model_globs(tmp_path: Path) -> None:
    search = Tenants.load(write(tmp_path, GOOD)).get("search")
    assert search.allows_model("kimi-k2.5") and search.allows_model("moonshot-v1-8k")
    assert not search.allows_model("kimi-k2.6") and not search.allows_model("Moonshot-v1-8k")
    assert not search.allows_model("moonshot-v1") and not search.allows_model("")
    assert Tenants.load(write(tmp_path, GOOD)).get("reports").allows_model("anything-at-all")


def test_max_priority_refuses_only_more_urgent_priorities(tmp_path: Path) -> None:
    tenants = Tenants.load(write(tmp_path, GOOD))
    assert [p for p in range(10) if tenants.get("search").allows_priority(p)] == list(range(3, 10))
    assert all(tenants.get("reports").allows_priority(p) for p in range(10))


def test_no_file_is_one_default_tenant_without_limits() -> None:
    tenants = Tenants.default()
    assert tenants.names == (DEFAULT_TENANT,) == ("default",)
    default = tenants.get("default")
    assert (default.rpm, default.tpm, default.max_inflight, default.daily_tokens, default.daily_usd) == (None,) * 5
    assert default.allows_model("any") and default.allows_priority(0) and default.weight == 1
    assert tenants.by_token("anything") is None
    # The gateway's tokens (MOONQ_GATEWAY_TOKENS) keep doing all they did: the default tenant, every job.
    gateway = Tenants.default(["t1", "t2"])
    assert gateway.by_token("t2") == Principal(DEFAULT_TENANT, operator=True)
    assert gateway.by_token("t3") is None


def test_an_unknown_tenant_is_a_clear_error_not_a_key_error(tmp_path: Path) -> None:
    tenants = Tenants.load(write(tmp_path, GOOD))
    with pytest.raises(UnknownTenant, match="unknown tenant 'default': not configured in MOONQ_TENANTS_FILE"):
        tenants.get("default")
    assert issubclass(UnknownTenant, MoonqError) and not issubclass(UnknownTenant, KeyError)
    assert "search" in tenants and "default" not in tenants and 3 not in tenants


def test_hash_token_is_the_hex_sha256_an_operator_writes() -> None:
    assert hash_token("s3cret") == hashlib.sha256(b"s3cret").hexdigest()
    assert hash_token("é") == hashlib.sha256("é".encode()).hexdigest()


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        (
            "t.json",
            '{"tenants": {"a": {"tokens_sha256": []}, "a": {"tokens_sha256": []}}}',
            'the key "a" is given twice',
        ),
        ("t.yaml", "tenants:\n  a: {tokens_sha256: []}\n  a: {tokens_sha256: []}\n", 'key "a" is given twice'),
        ("t.json", '{"tenants": {', "not valid JSON: line 1, column 14"),
        ("t.json", "tenants: {}", "not valid JSON"),
        ("t.yaml", "tenants: [\n", "not valid YAML: line 2"),
        ("t.yaml", "- a\n- b\n", "must hold one object (a mapping) at the top"),
        ("t.yaml", "", "must hold one object"),
        ("t.yaml", "!!python/object/apply:os.getcwd []\n", "not valid YAML"),
        ("t", "tenants: [\n", "not valid YAML"),
    ],
)
def test_a_file_that_is_not_an_object_is_refused(tmp_path: Path, name: str, text: str, says: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=re.escape(says)):
        Tenants.load(path)


def test_a_missing_or_binary_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read the file: No such file or directory"):
        Tenants.load(tmp_path / "absent.json")
    binary = tmp_path / "t.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigFileError, match="is not UTF-8 text"):
        Tenants.load(binary)


def test_a_yaml_error_does_not_quote_the_document(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("tenants:\n  a:\n    webhook_secrets: *whsec_not_quoted_so_an_alias\n")
    with pytest.raises(ConfigFileError, match="not valid YAML: line 3") as err:
        Tenants.load(path)
    assert "whsec_not_quoted" not in str(err.value)


def doc_examples(top: str) -> list[tuple[str, str]]:
    """``(suffix, text)`` of each JSON or YAML example in docs/tenants.md whose top level holds ``top``."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "tenants.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(json|yaml)\n(.*?)```", page, flags=re.DOTALL)
    return [(f".{kind}", text) for kind, text in blocks if top in yaml.safe_load(text)]


def test_the_examples_in_the_docs_load_alike(tmp_path: Path) -> None:
    examples = doc_examples("tenants")
    assert [suffix for suffix, _ in examples] == [".json", ".yaml"]
    loaded = []
    for n, (suffix, text) in enumerate(examples):
        path = tmp_path / f"example{n}{suffix}"
        path.write_text(text)
        loaded.append(Tenants.load(path))
    as_json, as_yaml = loaded
    assert as_json.names == as_yaml.names and all(as_json.get(n) == as_yaml.get(n) for n in as_json.names)
    for token, who in [("search-token-2", "search"), ("reports-token", "reports"), ("ops-console-token", None)]:
        assert as_yaml.by_token(token) == Principal(who, operator=who is None)


def test_the_accounts_examples_in_the_docs_are_valid_and_alike() -> None:
    examples = [yaml.safe_load(text) for _, text in doc_examples("accounts")]
    assert len(examples) == 2
    as_json, as_yaml = (validate(AccountsFile, data, "MOONQ_ACCOUNTS_FILE", "docs/tenants.md") for data in examples)
    assert as_json == as_yaml


def test_the_setting_and_the_cached_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("MOONQ_TENANTS_FILE", str(path))
    assert ClientSettings().tenants_file == str(path)
    monkeypatch.delenv("MOONQ_TENANTS_FILE")
    assert ClientSettings().tenants_file == ""
    first = cached_tenants(str(path))
    path.write_text("not read again")
    assert cached_tenants(str(path)) is first
    assert cached_tenants("").names == ("default",)
