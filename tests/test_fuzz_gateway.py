"""The gateway fuzzed from its own OpenAPI document (schemathesis), against the real worker.

Every operation gets schema-derived requests, valid and invalid (wrong types, missing fields,
bad headers, undeclared methods, no auth): no answer may be a 5xx, every answer must match the
document (status, content type, body schema, ``Allow`` on 405), and every error must be
Moonshot's error body, a 400 naming the field and the rule. Derandomized, so CI sees the same
requests each run; ``MOONQ_FUZZ_EXAMPLES`` raises the count for a deeper local run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from gateway.app import GatewaySettings
from gateway.openapi import openapi_document
from tests.helpers import serve_gateway

TOKEN = "gw-fuzz-token"
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"max-examples": int(os.environ.get("MOONQ_FUZZ_EXAMPLES", "15")), "deterministic": True},
        "checks": {
            # The document states types and ranges; the gateway also enforces rules no JSON schema can
            # (a tool result must answer an earlier call, partial only on the last message, non-empty
            # content per role), so schema-valid bodies may rightly get a 400. ``moonshot_error_body``
            # below checks that such a 400 names the field and the rule instead.
            "positive_data_acceptance": {"enabled": False},
        },
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)


@pytest.fixture(scope="module")
def gateway_url(redis_url: str) -> Iterator[str]:
    gw = GatewaySettings(redis_url=redis_url, gateway_tokens=TOKEN, gateway_max_body_bytes=64 * 1024)
    with serve_gateway(gw) as url:
        yield url


# One field path (plain names, or quoted keys: no raw line break), then the rule.
FIELD_AND_RULE = re.compile(r"Invalid request: [^\r\n]+?: \S.*", re.DOTALL)


def moonshot_error_body(ctx: Any, response: schemathesis.Response, case: schemathesis.Case[Any]) -> bool | None:
    """Every error is ``{"error": {"message", "type"}}``; a 400 or 413 says ``Invalid request: <field>: <rule>``."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type"}, body
    assert all(isinstance(v, str) and v for v in body["error"].values()), body
    if response.status_code in (400, 413):
        assert body["error"]["type"] == "invalid_request_error", body
        assert FIELD_AND_RULE.fullmatch(body["error"]["message"]), body
    return True


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_gateway_fuzz(case: schemathesis.Case[Any], gateway_url: str, worker: Any) -> None:
    case.call_and_validate(
        base_url=gateway_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=20,
        additional_checks=[moonshot_error_body],
    )


def test_the_fuzzed_document_is_the_served_one(gateway_url: str) -> None:
    served = httpx.get(f"{gateway_url}/openapi.json").json()
    assert served == openapi_document()
