"""Plain, portable JSON: what every peer of a request can carry, and how a field is named in errors.

Split from ``moonq/request.py``: these checks hold for known and unknown fields alike (no schema
rule covers them), and ``field_path`` names a place in a request the same way everywhere.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel

# Arrays and objects nested deeper than this are refused: pydantic cannot serialize past ~250
# levels, and Python's json cannot parse past ~1000, so a deeper request would fail later, in
# the gateway, the producer or the worker, instead of here with a clear message. A tool's JSON
# schema needs two levels per nested property; 64 leaves room for 30.
MAX_JSON_DEPTH = 64
# Integers a JSON peer can hold: the upstream (and Python's json past 4300 digits) cannot take more.
MAX_JSON_INT = 2**63 - 1
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, str):
        bad = None if value.isascii() else _SURROGATE_RE.search(value)
        if bad is not None:
            return f"is not valid Unicode: lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}"
    elif value is None or isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            return f"integer out of range: at most {MAX_JSON_INT} in magnitude (got {value.bit_length()} bits)"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return f"must be a finite number (got {value})"
    elif not isinstance(value, BaseModel):  # models (a Message, a Tool) are checked when they are built
        return f"is not a JSON value (got {type(value).__name__})"
    return None


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return f"keys must be strings (got {type(key).__name__} {key!r:.40})"
    rule = _scalar_problem(key)
    return None if rule is None else f"key {key!r:.40}: {rule}"


def json_problem(data: Any) -> tuple[str, str] | None:
    """A place where ``data`` is not plain, portable JSON, as ``(field, rule)`` (the first the walk
    meets: a container's own scalars before its nested containers); else None.

    Checks what no schema rule covers, in known and unknown fields alike: nesting depth, lone
    surrogates (not encodable as UTF-8), NaN/Infinity and integers beyond 64 bits. Iterative,
    so a hostile depth cannot exhaust the stack.
    """
    if not isinstance(data, dict | list | tuple):
        rule = _scalar_problem(data)
        return None if rule is None else (field_path(()), rule)
    # Only containers go on the stack with their path; a scalar is checked where it is found, and its
    # path is built only for the error (most of a request is ASCII strings: one isascii() each).
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            return field_path(path), f"is nested deeper than {MAX_JSON_DEPTH} levels"
        is_dict = isinstance(value, dict)
        for key, item in value.items() if is_dict else enumerate(value):
            if is_dict and (type(key) is not str or not key.isascii()) and (rule := _key_problem(key)) is not None:
                return field_path(path), rule
            kind = type(item)
            if kind is str:
                if item.isascii():
                    continue
            elif kind is dict or kind is list:
                stack.append((item, (*path, key)))
                continue
            elif item is None or kind is bool:
                continue
            elif isinstance(item, dict | list | tuple):
                stack.append((item, (*path, key)))
                continue
            if (rule := _scalar_problem(item)) is not None:
                return field_path((*path, key)), rule
    return None


_PLAIN_SEGMENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*|[0-9]+")


def field_path(parts: tuple[str | int, ...] | list[str | int]) -> str:
    """``messages.0.content``; a key that is not a plain name is quoted: ``x["a b"]["\\n"]``.

    Keys come from the caller and may hold anything (spaces, newlines, 10 kB): quoted and cut
    short, the path still reads as one field and stays on one line.
    """
    out = ""
    for part in parts:
        text = str(part)
        if len(text) <= 40 and _PLAIN_SEGMENT.fullmatch(text):
            out += f".{text}" if out else text
        else:
            out += f"[{json.dumps(text[:40] + ('...' if len(text) > 40 else ''))}]"
    return out or "request"
