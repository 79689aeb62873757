"""Lone UTF-16 surrogates in decoded upstream JSON, replaced before anything can store them.

The upstream's bytes are decoded as UTF-8 with errors replaced (``worker/sse.py``), so the text
itself never holds a surrogate; a JSON escape can still make one: ``"\\ud800"`` decodes to a Python
str that no UTF-8 encoder accepts. Such a str would fail wherever it is written to Redis, and a
relayed delta is written in the pipeline every job of the process shares (``ScriptSink``).
Replaced with U+FFFD, as invalid UTF-8 bytes already are.

Decoding happens per chunk, so the check is cheap first: only text with an escape of an
*unpaired* surrogate (a pair such as an emoji's ``\\ud83d\\ude00`` decodes to one valid character)
is walked at all.
"""

from __future__ import annotations

import re
from typing import Any

# A high-surrogate escape not followed by a low one, or a low one not right after a high one that is
# an escape for sure (no backslash before it: the JSON text \\ud83d\ude00 is a backslash, "ud83d" and a
# lone low surrogate). Erring the other way is harmless: an escaped backslash before "u" matches as
# well, and costs one walk that finds nothing.
_LONE_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    r"|(?<!(?<!\\)\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_LONE = re.compile("[\ud800-\udfff]")


def may_hold_lone_surrogate(json_text: str) -> bool:
    """Whether decoding ``json_text`` can give a str with a lone surrogate (never false when it can)."""
    return "\\u" in json_text and _LONE_ESCAPE.search(json_text) is not None


def _scrub(text: str) -> str:
    return _LONE.sub("\ufffd", text) if _LONE.search(text) else text


def replace_lone_surrogates(value: Any) -> Any:
    """``value`` (decoded JSON) with every lone surrogate, in keys and in values, made U+FFFD.

    Containers are changed in place and returned; iterative, so nesting as deep as the JSON
    decoder allows cannot exhaust the stack.
    """
    if isinstance(value, str):
        return _scrub(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(_LONE.search(key) for key in item if isinstance(key, str)):
                fixed = {_scrub(key) if isinstance(key, str) else key: v for key, v in item.items()}
                item.clear()
                item.update(fixed)
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)  # type: ignore[assignment]
        else:
            continue
        for key, child in list(children):
            if isinstance(child, str):
                item[key] = _scrub(child)
            elif isinstance(child, dict | list):
                stack.append(child)
    return value
