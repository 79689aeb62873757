"""The SSE decoder, fed one stream split at every byte boundary."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from worker.sse import SSEDecoder, SSEEvent

CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "月亮 — moon 🌕"}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]


def stream(sep: bytes) -> bytes:
    body = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + sep + sep for c in CHUNKS)
    return b": keep-alive comment" + sep + body + b"data: [DONE]" + sep + sep


def decode_all(parts: list[bytes]) -> list[SSEEvent]:
    dec = SSEDecoder()
    out: list[SSEEvent] = []
    for part in parts:
        out += dec.feed(part)
    return out + dec.flush()


EXPECTED = [json.dumps(c, ensure_ascii=False) for c in CHUNKS] + ["[DONE]"]


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_every_single_split_point(sep: bytes) -> None:
    data = stream(sep)
    for cut in range(len(data) + 1):
        events = decode_all([data[:cut], data[cut:]])
        assert [e.data for e in events] == EXPECTED, f"split at byte {cut}"


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_byte_by_byte(sep: bytes) -> None:
    data = stream(sep)
    assert [e.data for e in decode_all([data[i : i + 1] for i in range(len(data))])] == EXPECTED


def test_two_split_points_everywhere() -> None:
    data = stream(b"\r\n")
    step = 7  # every pair would be O(n^2) ~ 100k decodes; a stride still crosses every boundary kind
    for a in range(0, len(data), step):
        for b in range(a, len(data), step):
            assert [e.data for e in decode_all([data[:a], data[a:b], data[b:]])] == EXPECTED


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"data:no-space\n\n", [SSEEvent("no-space")]),
        (b"data: a\ndata: b\n\n", [SSEEvent("a\nb")]),
        (b"event: ping\nid: 7\ndata: x\n\n", [SSEEvent("x", event="ping", id="7")]),
        (b"event: only\n\n", []),
        (b": comment\n\n", []),
        (b"retry: 10\ndata: y\n\n", [SSEEvent("y")]),
        (b"data: tail-without-blank-line", [SSEEvent("tail-without-blank-line")]),
        (b"", []),
    ],
)
def test_field_rules(raw: bytes, expected: list[SSEEvent]) -> None:
    assert decode_all([raw]) == expected


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode_all([b"data: \xff\xfe ok\n\n"]) == [SSEEvent("\ufffd\ufffd ok")]


def test_whole_event_chunks_decode_as_byte_by_byte() -> None:
    # A chat stream's reads are mostly whole events ("data: {...}\n\n", one or several): those skip the line
    # scanner. Any mix of whole-event reads and other reads must give what byte-by-byte reading gives.
    rng = random.Random(7)
    kinds = [
        b"data: " + json.dumps(CHUNKS[1], ensure_ascii=False).encode() + b"\n\n",
        b"data: \n\n",  # empty data: an event with ""
        b"data: a\ndata: b\n\n",  # two data lines: not a whole-event read
        b"id: 42\ndata: with-id\n\n",
        b"data: after-id\n\n",  # keeps the last id
        b": comment\n\n",
        b"data:no-space\n\n",
        b"data: \xff bad utf-8\n\n",
        b"event: ping\ndata: typed\n\n",
        b"data: crlf\r\n\r\n",
    ]
    for _ in range(200):
        events = [rng.choice(kinds) for _ in range(rng.randint(1, 12))]
        data = b"".join(events)
        cuts = sorted(rng.sample(range(1, len(events)), rng.randint(0, len(events) - 1))) if len(events) > 1 else []
        bounds = [0, *cuts, len(events)]
        aligned = [b"".join(events[a:b]) for a, b in itertools.pairwise(bounds)]
        assert decode_all(aligned) == decode_all([data[i : i + 1] for i in range(len(data))])
    assert SSEDecoder()._whole_events(kinds[0] * 3) is not None  # the fast path is taken for those


def test_an_event_after_a_partial_line_is_not_taken_as_whole() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: par") == []
    assert dec.feed(b"tial\n\ndata: next\n\n") == [SSEEvent("partial"), SSEEvent("next")]
