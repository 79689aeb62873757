"""A job's request as the job page shows it: messages as parts, images as thumbnails, the body as JSON.

Pure. Everything here becomes text in an autoescaped template, never markup. Images: a
``data:image/...`` URL is shown as a thumbnail (the Content-Security-Policy allows ``img-src data:``);
a remote URL is shown as text and never loaded, so looking at a job does not tell an image's host
who looked, and when (a prompt's author could otherwise track the operators who open it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Longest string the JSON view shows whole (data URLs of images and videos are the usual giants).
JSON_STRING_CHARS = 300
# Largest data URL shown as a thumbnail, and most characters of thumbnails one page embeds; an image
# past either is named, not embedded (a request may carry 100 MB of images).
THUMBNAIL_MAX_CHARS = 2 * 1024 * 1024
THUMBNAILS_MAX_CHARS = 8 * 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


@dataclass(frozen=True)
class Part:
    """One piece of a message: ``kind`` is text, image (``src`` a data URL), link (not loaded) or code."""

    kind: str
    text: str = ""
    src: str = ""


@dataclass(frozen=True)
class Message:
    role: str
    parts: list[Part]
    name: str = ""


def _image(url: Any, budget: list[int]) -> Part:
    if not isinstance(url, str):
        return Part("code", json.dumps(url, ensure_ascii=False)[:JSON_STRING_CHARS])
    media = url[5:].partition(";")[0].lower() if url.startswith("data:") else ""
    if media in IMAGE_TYPES and len(url) <= min(THUMBNAIL_MAX_CHARS, budget[0]):
        budget[0] -= len(url)
        return Part("image", f"{media}, {len(url):,} characters", src=url)
    if url.startswith("data:"):
        return Part("link", f"{media or 'data'} ({len(url):,} characters, not shown)")
    return Part("link", f"remote image, not loaded: {url[:JSON_STRING_CHARS]}")


def _content_parts(content: Any, budget: list[int]) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Part("text", content)]
    if not isinstance(content, list):
        return [Part("code", shorten_json(content))]
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            parts.append(Part("text", str(item.get("text", ""))))
        elif kind == "image_url":
            image = item.get("image_url")
            parts.append(_image(image.get("url") if isinstance(image, dict) else image, budget))
        else:
            parts.append(Part("code", shorten_json(item)))
    return parts


def messages(request: dict[str, Any]) -> list[Message]:
    """The request's messages, each as parts to show (tool calls and results as code)."""
    out = []
    budget = [THUMBNAILS_MAX_CHARS]  # what is left of the page's thumbnail allowance
    for raw in request.get("messages") or []:
        if not isinstance(raw, dict):
            out.append(Message("?", [Part("code", shorten_json(raw))]))
            continue
        parts = []
        if raw.get("reasoning_content"):
            parts.append(Part("reasoning", str(raw["reasoning_content"])))
        parts += _content_parts(raw.get("content"), budget)
        for call in raw.get("tool_calls") or []:
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            parts.append(Part("code", f"{fn.get('name', '?')}({fn.get('arguments', '')})"))
        role = str(raw.get("role", "?"))
        if raw.get("tool_call_id"):
            role = f"{role} ({raw['tool_call_id']})"
        if raw.get("partial"):
            role = f"{role}, partial"
        out.append(Message(role, parts, str(raw.get("name") or "")))
    return out


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > JSON_STRING_CHARS:
        return f"{value[:JSON_STRING_CHARS]}… ({len(value):,} characters)"
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    return value


def shorten_json(value: Any) -> str:
    """``value`` as indented JSON, each string longer than ``JSON_STRING_CHARS`` cut with its length."""
    return json.dumps(_shorten(value), indent=2, ensure_ascii=False)


def answer(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each choice of a finished job's completion: ``{index, content, reasoning, tool_calls, finish_reason}``."""
    out = []
    for choice in (result or {}).get("choices") or []:
        message = choice.get("message") or {}
        calls = [
            {
                "id": c.get("id", ""),
                "name": (c.get("function") or {}).get("name", ""),
                "arguments": (c.get("function") or {}).get("arguments", ""),
            }
            for c in message.get("tool_calls") or []
            if isinstance(c, dict)
        ]
        out.append(
            {
                "index": choice.get("index", 0),
                "content": message.get("content") or "",
                "reasoning": message.get("reasoning_content") or "",
                "tool_calls": calls,
                "finish_reason": choice.get("finish_reason") or "",
            }
        )
    return out
