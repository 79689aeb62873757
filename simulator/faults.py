"""Fault kinds: what each one does to a request, and the ``name[:param]`` spec that names one.

Two families, kept in one registry:

- HTTP-level faults (``overload``, ``rate_limit``, ``quota``, ``server_error``, ``unavailable``)
  answer with an error instead of a completion, stream or not.
- ``huge_error`` answers 502 too, but with an edge proxy's error page that goes on for megabytes,
  trickling in (``huge_error_blocks``): a client must read only what it needs of an error body.
- Delivery faults change how a 200 reaches the client: ``drop`` (connection cut mid-body),
  ``truncate`` (clean end without ``[DONE]``), ``no_finish``, ``corrupt``, ``stall``, ``slow_first``.
  ``truncate``, ``no_finish`` and ``corrupt`` reshape SSE frames, so a JSON body has nothing for
  them to act on (``stream_only``). ``stall`` pauses before the middle frame, or before frame N
  with ``stall:<seconds>@N`` (frames count from 0, the role frame first).
- Hostile but well-formed streams, also ``stream_only``: ``surrogate`` (a text fragment that holds a
  lone UTF-16 surrogate, written as the JSON escape ``\\ud800``: valid JSON, not valid Unicode) and
  ``bad_usage`` (every usage count of the stream replaced by one of ``BAD_USAGE_VALUES``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from simulator.errors import ApiError, edge_unavailable, engine_overloaded, quota_exceeded, rate_limited, server_error
from simulator.stream import DONE_FRAME, Delivery, encode_frame


class Param(Enum):
    NONE = "none"
    SECONDS = "seconds"  # a number >= 0
    COUNT = "count"  # an integer >= 0: seconds in a message, a frame position, MiB, or a variant


@dataclass(frozen=True)
class FaultKind:
    name: str
    param: Param = Param.NONE
    # None for frame positions: the default is the middle of the stream, known only per response.
    default: float | None = None
    stream_only: bool = False


# Long enough to trip a typical client read timeout; a spec like "stall:0.3" shortens it.
DEFAULT_STALL_S = 30.0
# Delay quoted by the rate_limit fault unless given ("rate_limit:3"); short, so retry tests stay fast.
DEFAULT_RETRY_AFTER_S = 1
# The account limit quoted by the ``rate_limit`` fault: tier 1 (docs/moonshot-api.md §8).
FAULT_RPM = 200
# ``huge_error``: a 502 page of this many MiB unless given ("huge_error:1"), sent in blocks at the pace of a
# slow proxy (8 MiB/s), so a client that reads the whole body visibly waits for it.
DEFAULT_HUGE_ERROR_MIB = 64
HUGE_ERROR_STATUS = 502
HUGE_ERROR_BLOCK_BYTES = 64 * 1024
HUGE_ERROR_BLOCK_INTERVAL_S = 0.008
# ``bad_usage:<n>`` writes the n-th of these raw JSON values for every usage count (clamped to the last):
# not a number, negative, not JSON but what Python writes for NaN, a float beyond a double, a count
# beyond any context window.
BAD_USAGE_VALUES = ('"12 tokens"', "-12", "NaN", "1e400", "123456789012345678901234567890")

KINDS: dict[str, FaultKind] = {
    kind.name: kind
    for kind in (
        FaultKind("ok"),
        FaultKind("overload"),
        FaultKind("rate_limit", Param.COUNT, DEFAULT_RETRY_AFTER_S),
        FaultKind("quota"),
        FaultKind("server_error"),
        FaultKind("unavailable"),
        FaultKind("drop", Param.COUNT),
        FaultKind("truncate", Param.COUNT, stream_only=True),
        FaultKind("no_finish", stream_only=True),
        FaultKind("corrupt", Param.COUNT, stream_only=True),
        FaultKind("stall", Param.SECONDS, DEFAULT_STALL_S),
        FaultKind("slow_first", Param.SECONDS, DEFAULT_STALL_S),
        FaultKind("huge_error", Param.COUNT, DEFAULT_HUGE_ERROR_MIB),
        FaultKind("surrogate", Param.COUNT, stream_only=True),
        FaultKind("bad_usage", Param.COUNT, 0, stream_only=True),
    )
}
# What ``fault_rate`` draws from unless configured: the transient faults a retrying client must survive.
DEFAULT_RANDOM_KINDS = ("overload", "rate_limit", "server_error", "unavailable", "drop", "truncate", "corrupt")

_ERRORS: dict[str, Callable[[Fault], ApiError]] = {
    "overload": lambda f: engine_overloaded(),
    "rate_limit": lambda f: rate_limited(f"max RPM: {FAULT_RPM}", int(f.value)),
    "quota": lambda f: quota_exceeded(),
    "server_error": lambda f: server_error(),
    "unavailable": lambda f: edge_unavailable(),
}


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    param: float | None = None  # as given after the colon; None means the kind's default
    at: int | None = None  # the frame a stall comes before ("stall:2@5"); None: the middle one

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def value(self) -> float:
        """The parameter, or the kind's default; only meaningful for kinds with a fixed default."""
        chosen = self.param if self.param is not None else self.kind.default
        return 0.0 if chosen is None else chosen

    def applies(self, stream: bool) -> bool:
        """Whether the fault changes anything for this request; ``ok`` never does."""
        return self.name != "ok" and (stream or not self.kind.stream_only)

    def error(self) -> ApiError | None:
        """The error that replaces the answer, for HTTP-level faults."""
        make = _ERRORS.get(self.name)
        return make(self) if make is not None else None


def parse_fault(spec: Any) -> Fault:
    """Parses ``"name"`` or ``"name:param"``, e.g. ``"stall:2"`` or ``"drop:5"``.

    Raises:
        ValueError: unknown name, or a parameter the kind does not take; the message suits
            being prefixed with the field it came from.
    """
    if not isinstance(spec, str):
        raise ValueError(f"must be a fault name string, got {spec!r}")
    name, colon, raw = spec.partition(":")
    kind = KINDS.get(name.strip())
    if kind is None:
        raise ValueError(f"has an unknown fault {name!r}; known faults: {', '.join(KINDS)}")
    if not colon:
        return Fault(kind)
    if kind.param is Param.NONE:
        raise ValueError(f"{spec!r}: the fault {kind.name} takes no parameter")
    raw, sep, where = raw.partition("@")
    at = _frame(spec, where) if sep else None
    if sep and kind.name != "stall":
        raise ValueError(f"{spec!r}: only stall takes a frame position (@N)")
    try:
        value = float(raw) if kind.param is Param.SECONDS else int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):
        unit = "seconds" if kind.param is Param.SECONDS else "an integer"
        raise ValueError(f"{spec!r}: the parameter of {kind.name} must be {unit} >= 0")
    return Fault(kind, value, at)


def _frame(spec: str, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise ValueError(f"{spec!r}: the frame position after @ must be an integer >= 0")
    return int(raw)


@dataclass(frozen=True)
class Plan:
    """How one 200 answer goes on the wire: its SSE frames and their pacing."""

    frames: list[bytes]
    delivery: Delivery


def plan(fault: Fault | None, chunks: list[dict[str, Any]], base: Delivery) -> Plan:
    """Applies a delivery fault to a normal stream of ``chunks`` paced by ``base``.

    Frame positions count SSE frames from 0; a position past the end is clamped so the fault
    still shows (a ``drop`` never lets ``[DONE]`` through, a ``truncate`` never a finish_reason).
    """
    frames = [*map(encode_frame, chunks), DONE_FRAME]
    name = fault.name if fault is not None else "ok"
    # Frames before the first finish_reason: where a cut still leaves the answer unfinished.
    unfinished = next((i for i, chunk in enumerate(chunks) if _finishes(chunk)), len(chunks))
    at = _position(fault, unfinished)
    if name == "drop":
        return Plan(frames, replace(base, cut_after=min(at, len(frames) - 1)))
    if name == "truncate":
        return Plan(frames[: min(at, unfinished)], base)
    if name == "no_finish":
        return Plan([*(encode_frame(c) for c in chunks if not _finishes(c)), DONE_FRAME], base)
    if name == "corrupt":
        # Inserted, not replacing, so a client that skipped the line would still see the whole answer.
        at = max(1, min(at, len(frames) - 2))
        return Plan([*frames[:at], _mangled(frames[at]), *frames[at:]], base)
    if name == "stall" and fault is not None:
        before = max(1, len(frames) // 2) if fault.at is None else min(fault.at, len(frames) - 1)
        return Plan(frames, replace(base, stall_before=before, stall_s=fault.value))
    if name == "slow_first" and fault is not None:
        return Plan(frames, replace(base, first_token_latency_s=fault.value))
    if name == "surrogate":
        return Plan(_with_lone_surrogate(chunks, frames, at), base)
    if name == "bad_usage" and fault is not None:
        raw = BAD_USAGE_VALUES[min(int(fault.value), len(BAD_USAGE_VALUES) - 1)]
        bad = [_with_bad_usage(chunk, raw) if _usages(chunk) else encode_frame(chunk) for chunk in chunks]
        return Plan([*bad, DONE_FRAME], base)
    return Plan(frames, base)


def huge_error_blocks(fault: Fault) -> Iterator[bytes]:
    """The body of a ``huge_error``: a plain-text 502 page of ``fault.value`` MiB, block by block.

    The first block starts with the page's one line of sense; the rest is the padding a proxy's
    page (markup, a stack trace) is made of.
    """
    left = int(fault.value * 1024 * 1024)
    head = b"502 Bad Gateway: the upstream sent an invalid response.\n"
    padding = b"<!-- a proxy error page, padded -->\n" * (HUGE_ERROR_BLOCK_BYTES // 36 + 1)
    first = True
    while left > 0:
        block = ((head if first else b"") + padding)[: min(HUGE_ERROR_BLOCK_BYTES, left)]
        first = False
        left -= len(block)
        yield block


def _text_key(chunk: dict[str, Any]) -> str | None:
    """The text field (content or reasoning) of a chunk's first delta, if it has one."""
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return next((key for key in ("content", "reasoning_content") if isinstance(delta.get(key), str)), None)


def _with_lone_surrogate(chunks: list[dict[str, Any]], frames: list[bytes], at: int) -> list[bytes]:
    # The text chunk at or after ``at`` (else the last one before it: the opening chunk's content is "")
    # gets U+D800 in front of its text. ensure_ascii writes it as the escape \ud800, the only way a
    # lone surrogate travels in UTF-8 JSON.
    texts = [i for i, chunk in enumerate(chunks) if _text_key(chunk) is not None]
    if not texts:
        return frames
    pick = next((i for i in texts if i >= at), texts[-1])
    chunk = copy.deepcopy(chunks[pick])
    key = _text_key(chunk)
    assert key is not None
    delta = chunk["choices"][0]["delta"]
    delta[key] = "\ud800" + delta[key]
    data = json.dumps(chunk, ensure_ascii=True, separators=(",", ":"))
    return [*frames[:pick], f"data: {data}\n\n".encode(), *frames[pick + 1 :]]


_BAD = "__sim_bad_usage__"
_COUNT_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _usages(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The usage objects a chunk carries: the trailing total, and each choice's own (Moonshot's, §4)."""
    found = [chunk["usage"]] if isinstance(chunk.get("usage"), dict) else []
    return found + [c["usage"] for c in chunk.get("choices") or () if isinstance(c.get("usage"), dict)]


def _with_bad_usage(chunk: dict[str, Any], raw: str) -> bytes:
    chunk = copy.deepcopy(chunk)
    for usage in _usages(chunk):
        for part in (usage, *(v for v in usage.values() if isinstance(v, dict))):  # *_tokens_details too
            for key in _COUNT_KEYS:
                if key in part:
                    part[key] = _BAD
    data = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).replace(f'"{_BAD}"', raw)
    return f"data: {data}\n\n".encode()


def _finishes(chunk: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") is not None for choice in chunk.get("choices") or ())


def _mangled(frame: bytes) -> bytes:
    # Half a real frame's JSON, the way a proxy mangling a buffer shows; cut on a character, not a byte,
    # so the line still decodes as UTF-8 and only the JSON parse fails.
    text = frame.decode().removesuffix("\n\n")
    return (text[: len(text) // 2] + "\n\n").encode()


def _position(fault: Fault | None, unfinished: int) -> int:
    if fault is not None and fault.param is not None:
        return int(fault.param)
    # "Some chunks": half of the unfinished part, at least the role chunk.
    return max(1, unfinished // 2)
