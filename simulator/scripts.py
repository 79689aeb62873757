"""Choosing a request's fault: the ``sim`` body field first, else a seeded random draw.

The ``sim`` field (our queue passes unknown top-level fields through to the API unchanged):

- ``{"script": ["overload", "drop:5", "ok"], "key": "job-1"}`` — the n-th request carrying the key
  gets the n-th entry; the last entry repeats forever after. ``key`` defaults to a hash of the
  body without ``sim``, without a final ``partial`` assistant message and without the output budget,
  so a retried request walks the script whether it is sent again as it was or continued with
  Partial Mode (which appends to the text so far and shrinks the budget).
- ``{"fault": "stall:2"}`` — this fault on every request with this body.
- ``"stamp": true`` beside either — every streamed content fragment starts with the moment the
  simulator sent it, ``[t=<unix seconds>]``, for measuring relay latency downstream (benchmarks).

Entries are fault specs, ``name`` or ``name:param`` (see ``faults.parse_fault``). Only requests
that pass the quota check reach the picker, so a quota 429 does not use up a script entry.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simulator.errors import invalid_request
from simulator.faults import Fault, parse_fault
from simulator.tokens import compact_json

SIM_FIELD = "sim"
_SIM_KEYS = ("script", "fault", "key", "stamp")
_BUDGET_FIELDS = ("max_completion_tokens", "max_tokens")


@dataclass(frozen=True)
class Directive:
    """What a ``sim`` field asked for: faults in order, and the key that counts this body's requests."""

    script: tuple[Fault, ...]
    key: str
    stamp: bool = False


def parse_sim(body: dict[str, Any]) -> Directive | None:
    """Reads the ``sim`` field of a chat body; None when absent.

    Raises:
        ApiError: 400 invalid_request_error naming the offending field.
    """
    raw = body.get(SIM_FIELD)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid_request(f"{SIM_FIELD} must be an object")
    unknown = [name for name in raw if name not in _SIM_KEYS]
    if unknown:
        raise invalid_request(f"{SIM_FIELD}.{unknown[0]} is not a known field; use {', '.join(_SIM_KEYS)}")
    if ("script" in raw) == ("fault" in raw):
        raise invalid_request(f"{SIM_FIELD} needs exactly one of script or fault")
    if "fault" in raw:
        script: tuple[Fault, ...] = (_fault(raw["fault"], f"{SIM_FIELD}.fault"),)
    else:
        entries = raw["script"]
        if not isinstance(entries, list) or not entries:
            raise invalid_request(f"{SIM_FIELD}.script must be a non-empty list of fault names")
        script = tuple(_fault(entry, f"{SIM_FIELD}.script[{i}]") for i, entry in enumerate(entries))
    key = raw.get("key")
    if key is not None and not isinstance(key, str):
        raise invalid_request(f"{SIM_FIELD}.key must be a string")
    stamp = raw.get("stamp", False)
    if not isinstance(stamp, bool):
        raise invalid_request(f"{SIM_FIELD}.stamp must be a boolean")
    if key is None:
        key = hashlib.sha256(compact_json(_retry_invariant(body)).encode()).hexdigest()
    return Directive(script, key, stamp)


def _retry_invariant(body: dict[str, Any]) -> dict[str, Any]:
    """The body as every retry of it looks, a Partial Mode continuation included."""
    rest = {name: value for name, value in body.items() if name not in (SIM_FIELD, *_BUDGET_FIELDS)}
    messages = rest.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("partial"):
        rest["messages"] = messages[:-1]
    return rest


def _fault(spec: Any, field: str) -> Fault:
    try:
        return parse_fault(spec)
    except ValueError as err:
        raise invalid_request(f"{field} {err}") from err


class FaultPicker:
    """Picks each request's fault; deterministic for a given seed and request sequence.

    Args:
        seed: seeds the random draw (``random.Random(seed)``), re-seeded on ``reset``.
        rate: probability in [0, 1] that a request without ``sim`` gets a random fault.
        kinds: fault specs the random draw picks from, uniformly.
    """

    def __init__(self, seed: int, rate: float, kinds: Sequence[str]) -> None:
        self._seed = seed
        self._rate = rate
        self._kinds = tuple(parse_fault(spec) for spec in kinds)
        # A JSON body has no frames to truncate or corrupt; drawing only what applies keeps the
        # effective fault rate of non-stream requests at ``rate``.
        self._plain_kinds = tuple(fault for fault in self._kinds if fault.applies(stream=False))
        self.reset()

    def reset(self) -> None:
        self._rng = random.Random(self._seed)
        self._served: dict[str, int] = {}

    def pick(self, directive: Directive | None, stream: bool) -> Fault | None:
        """The fault for the next request, or None; ``ok`` and faults that do not apply give None."""
        fault = self._scripted(directive) if directive is not None else self._drawn(stream)
        return fault if fault is not None and fault.applies(stream) else None

    def _scripted(self, directive: Directive) -> Fault:
        served = self._served.get(directive.key, 0)
        self._served[directive.key] = served + 1
        return directive.script[min(served, len(directive.script) - 1)]

    def _drawn(self, stream: bool) -> Fault | None:
        if self._rate <= 0 or self._rng.random() >= self._rate:
            return None
        kinds = self._kinds if stream else self._plain_kinds
        return self._rng.choice(kinds) if kinds else None
