"""A deterministic stand-in tokenizer and the prompt token count built on it.

A token is a run of word characters, one CJK character, or one other non-space character. It is
not Moonshot's tokenizer; it only has to be stable, cheap and the same for prompt and output so
usage adds up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = rf"[{_CJK}]|(?:(?![{_CJK}])\w)+|[^\w\s]"
_TOKEN_RE = re.compile(_TOKEN)
# A piece is one token with the whitespace before it, so pieces concatenate back to the text.
_PIECE_RE = re.compile(rf"\s*(?:{_TOKEN})")

# Role markers the chat template wraps around every message.
MESSAGE_OVERHEAD_TOKENS = 4
# Media are billed by size on the real API; a flat price keeps counts predictable.
MEDIA_TOKENS = {"image_url": 256, "video_url": 1024}


def count(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def pieces(text: str) -> list[str]:
    """Split ``text`` into one string per token; ``"".join(pieces(t)) == t``."""
    out = [m.group() for m in _PIECE_RE.finditer(text)]
    used = sum(map(len, out))
    if used < len(text):  # trailing whitespace has no token of its own
        if out:
            out[-1] += text[used:]
        else:
            out.append(text[used:])
    return out


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return count(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            total += count(part["text"])
        elif isinstance(kind, str):
            total += MEDIA_TOKENS.get(kind, 0)
    return total


def _search_result_tokens(message: dict[str, Any]) -> int:
    # $web_search: the tool message echoes {"search_result":…,"usage":{"total_tokens":N}} and Moonshot
    # bills the N tokens of fetched pages as input (docs/moonshot-api.md §6).
    content = message.get("content")
    if message.get("role") != "tool" or not isinstance(content, str) or "search_result" not in content:
        return 0
    try:
        usage = json.loads(content).get("usage", {})
        return int(usage.get("total_tokens", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def message_tokens(message: dict[str, Any]) -> int:
    total = MESSAGE_OVERHEAD_TOKENS + content_tokens(message.get("content"))
    for key in ("name", "reasoning_content"):
        if isinstance(message.get(key), str):
            total += count(message[key])
    if message.get("tool_calls"):
        total += count(compact_json(message["tool_calls"]))
    return total + _search_result_tokens(message)


def tools_tokens(tools: Sequence[Any]) -> int:
    return count(compact_json(list(tools))) if tools else 0


def prefix_tokens(messages: Sequence[dict[str, Any]], tools: Sequence[Any]) -> list[int]:
    """Cumulative prompt size after each message: ``result[i]`` covers tools + messages[:i+1]."""
    running = tools_tokens(tools)
    out = []
    for message in messages:
        running += message_tokens(message)
        out.append(running)
    return out


def prompt_tokens(messages: Sequence[dict[str, Any]], tools: Sequence[Any]) -> int:
    sizes = prefix_tokens(messages, tools)
    return sizes[-1] if sizes else tools_tokens(tools)
