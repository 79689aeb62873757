"""The simulator's other reading of "L per minute": RPM and TPM as token buckets of size L (``quota_mode="bucket"``).

The sliding minute, its default, is tested with the other quota tests in tests/test_simulator_faults.py.
"""

from __future__ import annotations

import httpx
import pytest

from simulator import SimConfig, SimServer
from simulator.quota import Quotas, Rejection


def _rejected(rejection: Rejection | None) -> Rejection:
    assert rejection is not None
    return rejection


def test_an_rpm_bucket_refills_one_request_per_sixtieth_of_a_minute() -> None:
    quotas = Quotas(rpm=3, tpm=None, max_concurrency=None, mode="bucket")
    for _ in range(3):
        assert quotas.check(0.0, 1) is None
        quotas.admit(0.0, 1)
    rejection = _rejected(quotas.check(0.0, 1))
    assert rejection.axis == "rpm" and rejection.error.message.endswith("please try again after 20 seconds")
    assert _rejected(quotas.check(19.9, 1)).error.message.endswith("please try again after 1 seconds")
    for now in (20.0, 40.0):  # unlike the sliding minute: 2L - 1 within 40 s
        assert quotas.check(now, 1) is None
        quotas.admit(now, 1)
    assert quotas.check(59.9, 1) is not None and quotas.check(60.0, 1) is None


def test_a_tpm_bucket_takes_reservations_and_gets_back_what_was_not_used() -> None:
    quotas = Quotas(rpm=None, tpm=100, max_concurrency=None, mode="bucket")
    slot = quotas.admit(0.0, 60)
    rejection = _rejected(quotas.check(0.0, 41))
    assert rejection.axis == "tpm" and rejection.error.message.endswith("current:101, limit:100")
    quotas.settle(slot, 10)  # 50 of its 60 come back
    quotas.settle(slot, 10)  # idempotent
    assert quotas.check(0.0, 90) is None and quotas.check(0.0, 91) is not None
    assert quotas.check(6.0, 100) is None  # 10 refilled in 6 s
    old = quotas.admit(6.0, 100)
    quotas.reset()  # a full bucket again; the request from before the reset refunds nothing into it
    fresh = quotas.admit(6.0, 100)
    quotas.settle(old, 0)
    assert quotas.check(6.0, 1) is not None
    quotas.settle(fresh, 40)
    assert quotas.check(6.0, 60) is None and quotas.check(6.0, 61) is not None
    assert quotas.in_flight == 0


def test_the_quota_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="quota_mode must be one of window, bucket"):
        SimConfig(quota_mode="leaky")


def test_a_bucket_mode_server_answers_429_past_its_bucket() -> None:
    request = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with SimServer(SimConfig(rpm=2, quota_mode="bucket")) as server:
        headers = {"Authorization": "Bearer sk-test"}
        statuses = [
            httpx.post(f"{server.base_url}/chat/completions", json=request, headers=headers).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        assert server.stats()["rejected"] == {"rpm": 1}
