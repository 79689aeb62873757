"""Validation of the ``messages`` array: roles, content parts, Partial Mode and tool-call pairing.

As strict as the API where it is known (docs/moonshot-api.md §2, §5, §6): an assistant message with
neither content nor a tool call is refused (an empty ``tool_calls`` list is no call), as is an empty
text part, even beside other parts ("text content is empty"), and a ``partial`` that is not a
boolean. ``reasoning_content: ""`` is accepted: clients round-trip an empty reasoning that way, and
the API takes it (§9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simulator.catalog import ModelSpec
from simulator.errors import invalid_request, rejected
from simulator.tokens import MEDIA_TOKENS

ROLES = frozenset({"system", "user", "assistant", "tool"})
# Roles whose content must be non-empty; assistant may be empty (tool calls, Partial Mode "").
_NEEDS_CONTENT = frozenset({"system", "user", "tool"})
# Only inline data URLs and uploaded files; the API does not fetch remote media.
_MEDIA_SCHEMES = ("data:", "ms://")

Message = dict[str, Any]


def check_messages(raw: Any, spec: ModelSpec) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise invalid_request("messages must be a non-empty list")
    for i, message in enumerate(raw):
        _check_message(i, message, spec, is_last=i == len(raw) - 1)
    _check_tool_pairing(raw)
    return raw


def partial_prefix(messages: Sequence[Message]) -> str | None:
    """The prefix to continue when the request is in Partial Mode, else ``None``."""
    last = messages[-1]
    if last.get("role") == "assistant" and last.get("partial") is True:
        content = last.get("content")
        return content if isinstance(content, str) else ""
    return None


def check_reasoning_kept(messages: Sequence[Message]) -> None:
    """With thinking on, every assistant tool-call message must carry its ``reasoning_content``."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("tool_calls") and message.get("reasoning_content") is None:
            raise rejected(
                f"thinking is enabled but reasoning_content is missing in assistant tool call message at index {i}"
            )


def _check_message(i: int, message: Any, spec: ModelSpec, *, is_last: bool) -> None:
    if not isinstance(message, dict):
        raise invalid_request(f"the message at position {i} must be an object")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid_request(f"the message at position {i} has an unknown role {role!r}")
    _check_content(i, role, message.get("content"), spec)
    partial = message.get("partial")
    if partial is not None and not isinstance(partial, bool):
        raise invalid_request(f"partial of the message at position {i} must be a boolean")
    if partial and (not is_last or role != "assistant"):
        raise invalid_request("partial is only allowed on the last message, which must be an assistant message")
    if role == "assistant" and not partial and not message.get("tool_calls") and _is_empty(message.get("content")):
        raise invalid_request(f"the message at position {i} with role 'assistant' must not be empty")


def _is_empty(content: Any) -> bool:
    return content is None or content == "" or content == []


def _check_content(i: int, role: str, content: Any, spec: ModelSpec) -> None:
    if _is_empty(content):
        if role in _NEEDS_CONTENT:
            raise invalid_request(f"the message at position {i} with role '{role}' must not be empty")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid_request(f"the content of the message at position {i} must be a string or a list of parts")
    for part in content:
        _check_part(i, part, spec)


def _check_part(i: int, part: Any, spec: ModelSpec) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid_request(f"a text part of the message at position {i} has no text")
        if not part["text"]:
            raise invalid_request("text content is empty")
        return
    if not isinstance(kind, str) or kind not in MEDIA_TOKENS:
        raise invalid_request(f"the message at position {i} has a content part of unknown type {kind!r}")
    medium = "image" if kind == "image_url" else "video"
    if not spec.vision:
        raise invalid_request(f"the model {spec.id} does not support {medium} input")
    url = _media_url(part.get(kind))
    if not url:
        raise invalid_request(f"{kind}.url is required in the message at position {i}")
    if not url.startswith(_MEDIA_SCHEMES):
        raise invalid_request(
            f"{kind}.url must be a base64 data URL or ms://<file_id>; remote {medium} URLs are not supported"
        )


def _media_url(value: Any) -> str | None:
    # The API takes {"url": ...} or, as a shorthand, the bare URL string.
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) and value else None


def _tool_call_ids(i: int, message: Message) -> list[str]:
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise invalid_request(f"tool_calls of the message at position {i} must be a list")
    ids = []
    for call in calls:
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(call.get("function"), dict)
        ):
            raise invalid_request(f"each tool call of the message at position {i} needs an id and a function")
        ids.append(call["id"])
    return ids


def _check_tool_pairing(messages: Sequence[Message]) -> None:
    seen: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            ids = _tool_call_ids(i, message)
            for call_id in ids:
                if call_id in seen:
                    raise invalid_request(f"tool call id {call_id} is duplicated")
                seen.add(call_id)
            if ids and i < len(messages) - 1:
                _check_answered(messages, i, ids)
        elif message["role"] == "tool":
            answer_id = message.get("tool_call_id")
            if not isinstance(answer_id, str) or answer_id not in seen:
                raise invalid_request(f"tool_call_id not found: {answer_id}")


def _check_answered(messages: Sequence[Message], i: int, ids: list[str]) -> None:
    answered = set()
    for message in messages[i + 1 :]:
        if message["role"] != "tool":
            break
        answered.add(str(message.get("tool_call_id")))
    missing = [call_id for call_id in ids if call_id not in answered]
    if missing:
        raise rejected(
            "an assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(missing)}"
        )
