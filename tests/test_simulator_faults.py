"""The simulator's injected faults, account limits and stats, over real HTTP.

Each fault must look exactly like the real API's (status, compact body, no Retry-After) or like a
real broken stream, because the queue's retry logic is tested end to end against them.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from simulator import SimConfig, SimServer, max_in_window
from simulator.cli import main
from simulator.quota import Quotas, Rejection
from simulator.tokens import prompt_tokens

KEY = {"Authorization": "Bearer sk-test"}
USER = [{"role": "user", "content": "Tell me about rivers."}]
ACCOUNT = "Your account org-sim<ak-sim>"


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=0)) as server:
        yield server


@pytest.fixture
def api(sim_server: SimServer) -> Iterator[httpx.Client]:
    sim_server.reset()
    with httpx.Client(base_url=sim_server.base_url, headers=KEY, timeout=10) as c:
        yield c


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "moonshot-v1-8k", "messages": USER, **fields}


def chat(api: httpx.Client, **fields: Any) -> httpx.Response:
    return api.post("/chat/completions", json=body(**fields))


def error_bytes(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_}}, separators=(",", ":")).encode()


def frames(raw: bytes) -> list[str]:
    """SSE data payloads of a raw body; asserts it ends on a frame boundary."""
    text = raw.decode()
    assert text.endswith("\n\n")
    return [frame.removeprefix("data: ") for frame in text.split("\n\n")[:-1]]


def chunks(payloads: list[str]) -> list[Any]:
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def finish_reasons(parsed: list[Any]) -> list[Any]:
    return [c["choices"][0]["finish_reason"] for c in parsed if c["choices"] and c["choices"][0]["finish_reason"]]


def content(parsed: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in parsed if c["choices"])


HTTP_FAULTS = [
    ("overload", 429, "engine_overloaded_error", "The engine is currently overloaded, please try again later"),
    (
        "rate_limit",
        429,
        "rate_limit_reached_error",
        f"{ACCOUNT} request reached organization max RPM: 200, please try again after 1 seconds",
    ),
    (
        "rate_limit:3",
        429,
        "rate_limit_reached_error",
        f"{ACCOUNT} request reached organization max RPM: 200, please try again after 3 seconds",
    ),
    (
        "quota",
        429,
        "exceeded_current_quota_error",
        "You exceeded your current token quota: <org-sim> 0.0, please check your account balance",
    ),
    ("server_error", 500, "server_error", "Internal server error, please try again later"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "status", "type_", "message"), HTTP_FAULTS)
def test_http_fault(api: httpx.Client, fault: str, status: int, type_: str, message: str, stream: bool) -> None:
    response = chat(api, stream=stream, sim={"fault": fault})
    assert response.status_code == status
    assert response.content == error_bytes(message, type_)
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert "retry-after" not in response.headers and "msh-request-id" in response.headers


def test_unavailable_is_plain_text_from_the_edge(api: httpx.Client) -> None:
    response = chat(api, stream=True, sim={"fault": "unavailable"})
    assert response.status_code == 503 and response.headers["content-type"] == "text/plain"
    assert response.text.startswith("upstream connect error") and "retry-after" not in response.headers
    with pytest.raises(ValueError):
        response.json()


@pytest.mark.parametrize("fault", ["drop", "drop:3"])
def test_drop_cuts_the_stream(api: httpx.Client, fault: str) -> None:
    received = b""
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        with api.stream("POST", "/chat/completions", json=body(stream=True, sim={"fault": fault})) as response:
            assert response.status_code == 200
            for piece in response.iter_raw():
                received += piece
    payloads = frames(received)
    assert payloads and "[DONE]" not in payloads and not finish_reasons(chunks(payloads))
    if fault == "drop:3":
        assert len(payloads) == 3


def test_drop_cuts_a_plain_body(api: httpx.Client) -> None:
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        chat(api, sim={"fault": "drop"})


def test_truncate_ends_cleanly_without_done(api: httpx.Client) -> None:
    normal = chunks(frames(chat(api, stream=True).content))
    response = chat(api, stream=True, sim={"fault": "truncate"})
    assert response.status_code == 200
    assert b"[DONE]" not in response.content
    parsed = chunks(frames(response.content))
    assert 1 <= len(parsed) < len(normal) and not finish_reasons(parsed)
    assert content(normal).startswith(content(parsed))
    assert len(chunks(frames(chat(api, stream=True, sim={"fault": "truncate:2"}).content))) == 2


def test_no_finish_ends_with_done_but_no_finish_reason(api: httpx.Client) -> None:
    normal = chunks(frames(chat(api, stream=True).content))
    payloads = frames(chat(api, stream=True, sim={"fault": "no_finish"}).content)
    assert payloads[-1] == "[DONE]" and not finish_reasons(chunks(payloads))
    assert content(chunks(payloads)) == content(normal) and finish_reasons(normal) == ["stop"]


def test_corrupt_inserts_one_undecodable_line(api: httpx.Client) -> None:
    normal = frames(chat(api, stream=True).content)
    payloads = frames(chat(api, stream=True, sim={"fault": "corrupt"}).content)
    bad = []
    for i, payload in enumerate(payloads):
        try:
            json.loads(payload) if payload != "[DONE]" else None
        except ValueError:
            bad.append(i)
    assert len(bad) == 1 and 0 < bad[0] < len(payloads) - 2
    assert len(payloads) == len(normal) + 1 and payloads[-1] == "[DONE]"
    good = [p for i, p in enumerate(payloads) if i not in bad]
    assert content(chunks(good)) == content(chunks(normal))


def test_stall_pauses_mid_stream_then_continues(api: httpx.Client) -> None:
    arrivals: list[float] = []
    received = b""
    with api.stream("POST", "/chat/completions", json=body(stream=True, sim={"fault": "stall:0.3"})) as response:
        for piece in response.iter_raw():
            arrivals.append(time.monotonic())
            received += piece
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Unpaced frames go out in one write before the stall and one after: one long gap.
    assert len([gap for gap in gaps if gap >= 0.25]) == 1
    assert frames(received)[-1] == "[DONE]" and finish_reasons(chunks(frames(received))) == ["stop"]
    # A client read timeout shorter than the stall trips.
    with pytest.raises(httpx.ReadTimeout):
        api.post(
            "/chat/completions", json=body(stream=True, sim={"fault": "stall:0.3"}), timeout=httpx.Timeout(5, read=0.1)
        )


def test_slow_first_delays_the_first_chunk(api: httpx.Client) -> None:
    started = time.monotonic()
    with api.stream("POST", "/chat/completions", json=body(stream=True, sim={"fault": "slow_first:0.3"})) as response:
        headers_at = time.monotonic()
        pieces = response.iter_raw()
        first = next(pieces)
        first_at = time.monotonic()
        rest = b"".join(pieces)
    assert headers_at - started < 0.2 and first_at - started >= 0.28
    assert frames(first + rest)[-1] == "[DONE]"
    started = time.monotonic()
    assert chat(api, sim={"fault": "slow_first:0.3"}).status_code == 200
    assert time.monotonic() - started >= 0.28


def test_ok_and_stream_only_faults_leave_plain_requests_alone(sim_server: SimServer, api: httpx.Client) -> None:
    normal = chat(api).json()["choices"]
    for fault in ("ok", "truncate", "no_finish", "corrupt"):
        response = chat(api, sim={"fault": fault})
        assert response.status_code == 200 and response.json()["choices"] == normal
    assert chat(api, stream=True, sim={"fault": "ok"}).text.endswith("data: [DONE]\n\n")
    stats = sim_server.stats()
    assert stats["by_fault"] == {} and all(r["fault"] is None for r in stats["admitted"])


def test_script_walks_per_key_and_repeats_the_last_entry(api: httpx.Client) -> None:
    script = {"script": ["overload", "overload", "ok"]}
    statuses = [chat(api, sim={**script, "key": "job-1"}).status_code for _ in range(5)]
    assert statuses == [429, 429, 200, 200, 200]
    # Another key has its own counter.
    assert chat(api, sim={**script, "key": "job-2"}).status_code == 429
    # Without a key, the body (minus sim) is the key: a retried request walks the script.
    other = [{"role": "user", "content": "Another question."}]
    assert [chat(api, messages=other, sim=script).status_code for _ in range(3)] == [429, 429, 200]
    assert chat(api, messages=other, temperature=0.5, sim=script).status_code == 429
    # Mixed kinds, with parameters.
    mixed = {"script": ["rate_limit:2", "server_error", "ok"], "key": "job-3"}
    first = chat(api, sim=mixed)
    assert first.status_code == 429 and first.json()["error"]["message"].endswith("please try again after 2 seconds")
    assert [chat(api, sim=mixed).status_code for _ in range(2)] == [500, 200]


@pytest.mark.parametrize(
    ("sim", "message"),
    [
        ({"script": ["overload", "overlaod"]}, "sim.script[1] has an unknown fault 'overlaod'"),
        ({"fault": "explode"}, "sim.fault has an unknown fault 'explode'"),
        ({"fault": "overload:2"}, "sim.fault 'overload:2': the fault overload takes no parameter"),
        ({"fault": "stall:soon"}, "sim.fault 'stall:soon': the parameter of stall must be seconds >= 0"),
        ({"fault": "drop:1.5"}, "sim.fault 'drop:1.5': the parameter of drop must be an integer >= 0"),
        ({"script": []}, "sim.script must be a non-empty list"),
        ({"script": [3]}, "sim.script[0] must be a fault name string"),
        ({"fault": "ok", "script": ["ok"]}, "sim needs exactly one of script or fault"),
        ({"fault": "ok", "key": 7}, "sim.key must be a string"),
        ({"fault": "ok", "faults": 1}, "sim.faults is not a known field"),
        ({"fault": "ok", "stamp": "yes"}, "sim.stamp must be a boolean"),
        ("overload", "sim must be an object"),
    ],
)
def test_bad_sim_field(api: httpx.Client, sim: Any, message: str) -> None:
    response = chat(api, sim=sim)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"Invalid request: {message}")


def test_stamp_prefixes_each_content_fragment_with_its_send_time(api: httpx.Client) -> None:
    before = time.time()
    raw = chat(api, stream=True, sim={"fault": "ok", "stamp": True}).read()
    after = time.time()
    chunks = [json.loads(f) for f in frames(raw) if f != "[DONE]"]
    contents = [c["choices"][0]["delta"]["content"] for c in chunks if "content" in c["choices"][0]["delta"]]
    assert contents, "no content fragments"
    for text in contents:
        stamp = re.match(r"\[t=(\d+\.\d{6})\]", text)
        assert stamp is not None, text
        assert before <= float(stamp.group(1)) <= after
    # Without the flag the same request is unstamped.
    plain = [json.loads(f) for f in frames(chat(api, stream=True, sim={"fault": "ok"}).read()) if f != "[DONE]"]
    assert not any("[t=" in c["choices"][0]["delta"].get("content", "") for c in plain)


def _outcomes(server: SimServer, requests: int) -> list[str]:
    out = []
    with httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c:
        for _ in range(requests):
            try:
                out.append(str(chat(c).status_code))
            except httpx.HTTPError as err:
                out.append(type(err).__name__)
    return out


def test_fault_rate_is_seeded_and_near_the_rate() -> None:
    cfg = SimConfig(seed=7, fault_rate=0.3)
    with SimServer(cfg) as first, SimServer(cfg) as second:
        outcomes = _outcomes(first, 200)
        assert _outcomes(second, 200) == outcomes
        stats = first.stats()
    faults = [o for o in outcomes if o != "200"]
    # 200 draws at p=0.3: mean 60, sd 6.5; a non-stream request only draws faults it can show.
    assert 40 <= len(faults) <= 80
    assert set(faults) <= {"429", "500", "503", "RemoteProtocolError"}
    assert sum(stats["by_fault"].values()) == len(faults)
    assert set(stats["by_fault"]) <= {"overload", "rate_limit", "server_error", "unavailable", "drop"}


def test_fault_kinds_restrict_the_draw() -> None:
    with SimServer(SimConfig(seed=1, fault_rate=1.0, fault_kinds=("quota",))) as server:
        assert set(_outcomes(server, 5)) == {"429"}
        assert server.stats()["by_fault"] == {"quota": 5}


def test_max_concurrency() -> None:
    with (
        SimServer(SimConfig(max_concurrency=2)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c,
    ):
        slow = body(stream=True, sim={"fault": "slow_first:0.4"})
        with c.stream("POST", "/chat/completions", json=slow) as one, c.stream("POST", "/chat/completions", json=slow):
            assert one.status_code == 200
            rejected = chat(c)
            assert rejected.status_code == 429
            assert rejected.content == error_bytes(
                f"{ACCOUNT} request reached organization max concurrency: 2, please try again after 1 seconds",
                "rate_limit_reached_error",
            )
            assert server.stats()["in_flight"] == 2
        _wait_until_idle(server)
        assert chat(c).status_code == 200
        stats = server.stats()
    assert stats["rejected"] == {"concurrency": 1} and len(stats["admitted"]) == 3


def _wait_until_idle(server: SimServer) -> None:
    deadline = time.monotonic() + 5
    while server.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)


def test_rpm() -> None:
    with (
        SimServer(SimConfig(rpm=3)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c,
    ):
        assert [chat(c).status_code for _ in range(3)] == [200] * 3
        rejected = chat(c)
        assert rejected.status_code == 429 and "retry-after" not in rejected.headers
        error = rejected.json()["error"]
        assert error["type"] == "rate_limit_reached_error"
        match = re.fullmatch(
            rf"{re.escape(ACCOUNT)} request reached organization max RPM: 3, please try again after (\d+) seconds",
            error["message"],
        )
        assert match and 0 < int(match[1]) <= 60
        # Rejected requests are not admitted: they do not push the window further out.
        assert chat(c).status_code == 429
        stats = server.stats()
    assert len(stats["admitted"]) == 3 and stats["max_requests_in_any_60s"] == 3
    assert stats["rejected"] == {"rpm": 2} and stats["by_status"] == {"200": 3, "429": 2}


def test_tpm_checks_prompt_plus_budget() -> None:
    with (
        SimServer(SimConfig(tpm=1000)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c,
    ):
        prompt = prompt_tokens(USER, [])
        rejected = chat(c, max_completion_tokens=2000)
        assert rejected.status_code == 429
        assert rejected.content == error_bytes(
            f"{ACCOUNT} request reached TPM rate limit, current:{prompt + 2000}, limit:1000", "rate_limit_reached_error"
        )
        # max_tokens counts the same way, times n.
        assert chat(c, max_tokens=400, n=3).status_code == 429
        assert chat(c, max_tokens=400).status_code == 200
        assert server.stats()["rejected"] == {"tpm": 2}


def test_tpm_refunds_unused_budget_on_completion() -> None:
    prompt = prompt_tokens(USER, [])
    budget = 100
    # Room for one reservation plus one finished request (prompt + 5), not for two reservations.
    tpm = 2 * prompt + budget + 5 + budget // 2
    with (
        SimServer(SimConfig(answer_tokens=(5, 5), tpm=tpm)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c,
    ):
        slow = body(stream=True, max_completion_tokens=budget, sim={"fault": "slow_first:0.3"})
        with c.stream("POST", "/chat/completions", json=slow) as held:
            assert held.status_code == 200
            # While the first is in flight its whole reservation counts.
            assert chat(c, max_completion_tokens=budget).status_code == 429
            held.read()
        _wait_until_idle(server)
        # Finished, it counts prompt + 5: a new reservation fits beside it.
        assert chat(c, max_completion_tokens=budget).status_code == 200
        stats = server.stats()
    first, _ = stats["admitted"]
    assert first["charged_tokens"] == prompt + 5 and first["reserved_tokens"] == prompt + budget
    assert stats["max_tokens_in_any_60s"] == 2 * prompt + 10 <= tpm


def test_rejected_requests_leave_no_trace() -> None:
    with (
        SimServer(SimConfig(tpm=600, rpm=5)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c,
    ):
        for _ in range(3):
            assert chat(c, max_completion_tokens=5000).status_code == 429  # over TPM
            assert chat(c, sim={"fault": "overload"}).status_code == 429  # a 429 fault
        # Were any of those six counted, RPM (5) or TPM would refuse these.
        assert [chat(c, max_completion_tokens=100).status_code for _ in range(5)] == [200] * 5
        stats = server.stats()
    assert len(stats["admitted"]) == 5 and stats["by_status"] == {"200": 5, "429": 6}


def test_failed_requests_count_towards_rpm_but_not_tokens(api: httpx.Client, sim_server: SimServer) -> None:
    assert chat(api, sim={"fault": "server_error"}).status_code == 500
    assert chat(api, sim={"fault": "unavailable"}).status_code == 503
    [failed, unavailable] = sim_server.stats()["admitted"]
    assert (failed["status"], failed["charged_tokens"], failed["fault"]) == (500, 0, "server_error")
    assert (unavailable["status"], unavailable["charged_tokens"]) == (503, 0)


def test_stats_endpoint(sim_server: SimServer, api: httpx.Client) -> None:
    plain = chat(api).json()["usage"]
    chat(api, n=2, max_completion_tokens=50)
    assert chat(api, sim={"fault": "overload"}).status_code == 429
    assert api.post("/chat/completions", json={"model": "nope", "messages": USER}).status_code == 404
    raw = httpx.get(f"http://{sim_server.host}:{sim_server.port}/_sim/stats")  # no auth needed
    assert raw.status_code == 200
    stats = raw.json()
    assert stats["requests"] == 4 and stats["by_status"] == {"200": 2, "404": 1, "429": 1}
    assert stats["by_fault"] == {"overload": 1} and stats["rejected"] == {} and stats["in_flight"] == 0
    first, second = stats["admitted"]
    assert set(first) == {
        "start",
        "end",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "reserved_tokens",
        "charged_tokens",
        "fault",
    }
    assert 0 <= first["start"] <= first["end"] <= second["start"] <= stats["uptime_s"]
    assert (first["prompt_tokens"], first["completion_tokens"]) == (plain["prompt_tokens"], plain["completion_tokens"])
    assert first["reserved_tokens"] == plain["prompt_tokens"] + 1024  # moonshot-v1's default budget
    assert first["charged_tokens"] == plain["total_tokens"] and first["fault"] is None
    assert second["reserved_tokens"] == second["prompt_tokens"] + 2 * 50
    assert stats["max_requests_in_any_60s"] == 2
    assert stats["max_tokens_in_any_60s"] == first["charged_tokens"] + second["charged_tokens"]
    python = sim_server.stats()
    assert {k: v for k, v in python.items() if k != "uptime_s"} == {k: v for k, v in stats.items() if k != "uptime_s"}


def test_reset_clears_stats_windows_and_scripts() -> None:
    with (
        SimServer(SimConfig(rpm=2)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=10) as c,
    ):
        script = {"script": ["overload", "ok"], "key": "k"}
        assert [chat(c, sim=script).status_code for _ in range(4)] == [429, 200, 200, 429]  # the last is RPM
        reset = httpx.post(f"http://{server.host}:{server.port}/_sim/reset")
        assert reset.status_code == 200
        assert server.stats()["requests"] == 0 and server.stats()["admitted"] == []
        # The RPM window is empty again and the script starts over.
        assert [chat(c, sim=script).status_code for _ in range(3)] == [429, 200, 200]
        server.reset()
        assert chat(c, sim=script).status_code == 429


@pytest.mark.parametrize(
    ("events", "window", "expected"),
    [
        ([], 60, 0),
        ([(0, 1)], 60, 1),
        ([(0, 1), (59.9, 1), (60, 1)], 60, 2),  # half-open: 0 and 60 are never in one window
        ([(120, 5), (0, 1), (30, 2), (61, 4)], 60, 9),  # unsorted input; 61 and 120 share a window
        ([(1, 1), (1, 1), (1, 1)], 0.5, 3),
        ([(0, 10), (10, 1), (20, 1), (65, 1)], 60, 12),
    ],
)
def test_max_in_window(events: list[tuple[float, float]], window: float, expected: float) -> None:
    assert max_in_window(events, window) == expected


def _rejected(rejection: Rejection | None) -> Rejection:
    assert rejection is not None
    return rejection


def test_rpm_window_slides() -> None:
    quotas = Quotas(rpm=3, tpm=None, max_concurrency=None)
    for start in (0.0, 10.0, 20.0):
        quotas.admit(start, 1)
    rejection = _rejected(quotas.check(30.0, 1))
    assert rejection.axis == "rpm" and rejection.error.message.endswith("please try again after 30 seconds")
    # Rounded up, so never "after 0 seconds".
    assert _rejected(quotas.check(59.5, 1)).error.message.endswith("please try again after 1 seconds")
    assert quotas.check(60.0, 1) is None  # the request at 0 s has left (now - 60 s, now]


def test_tpm_window_counts_reservations_until_settled() -> None:
    quotas = Quotas(rpm=None, tpm=100, max_concurrency=None)
    first, second, _ = (quotas.admit(start, 30) for start in (0.0, 10.0, 20.0))
    rejection = _rejected(quotas.check(30.0, 11))
    assert rejection.axis == "tpm" and rejection.error.message.endswith("current:101, limit:100")
    quotas.settle(second, 5)  # finished: its actual total replaces its reservation
    assert quotas.check(30.0, 35) is None and quotas.check(30.0, 36) is not None
    assert quotas.check(60.0, 65) is None  # the request at 0 s has left the window
    quotas.settle(first, 1)  # settling a request already out of the window changes nothing
    assert quotas.check(60.0, 65) is None and quotas.check(60.0, 66) is not None
    assert quotas.in_flight == 1


def test_concurrency_slots() -> None:
    quotas = Quotas(rpm=None, tpm=None, max_concurrency=1)
    slot = quotas.admit(0.0, 1)
    assert _rejected(quotas.check(0.0, 1)).axis == "concurrency"
    quotas.settle(slot, 1)
    quotas.settle(slot, 1)  # idempotent
    assert quotas.check(0.0, 1) is None and quotas.in_flight == 0


BAD_CONFIGS: list[dict[str, Any]] = [
    {"fault_rate": 1.5},
    {"fault_rate": 0.5, "fault_kinds": ()},
    {"fault_kinds": ("overload", "nope")},
    {"fault_kinds": ("stall:-1",)},
    {"rpm": 0},
    {"tpm": 0},
    {"max_concurrency": 0},
]


@pytest.mark.parametrize("bad", BAD_CONFIGS)
def test_config_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**bad)


def test_cli_validates_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert SimConfig(fault_kinds=["stall:2", "drop:5"]).fault_kinds == ("stall:2", "drop:5")  # type: ignore[arg-type]
    assert main(["--port", "0", "--fault-kinds", "overload,explode"]) == 2
    assert "unknown fault 'explode'" in capsys.readouterr().err
    assert main(["--port", "0", "--fault-rate", "2"]) == 2
    assert "fault_rate must be in [0, 1]" in capsys.readouterr().err
