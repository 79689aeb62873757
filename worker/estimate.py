"""What a request will count against TPM before it is sent: the prompt estimate plus the budget.

Moonshot checks TPM against prompt tokens + ``max_tokens`` (or the model's default), not the
output actually produced (docs/moonshot-api.md §8). We cannot run Moonshot's tokenizer here, so
the prompt is estimated from text on the high side (an over-estimate costs a little waiting,
an under-estimate costs a 429), and the limiter settles the difference from the reported usage.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Output budgets when the request names none (docs/moonshot-api.md §2: 1024 for older models, 32768
# for k2.5/k2.6, 131072 for k3). Prefix match, longest first.
DEFAULT_COMPLETION_BUDGET: tuple[tuple[str, int], ...] = (
    ("kimi-k3", 131072),
    ("kimi-k2.7", 32768),
    ("kimi-k2.6", 32768),
    ("kimi-k2.5", 32768),
    ("kimi-k2-thinking", 32768),
    ("kimi-k2", 1024),
    ("kimi-latest", 1024),
    ("moonshot-v1", 1024),
)
FALLBACK_COMPLETION_BUDGET = 4096
PER_MESSAGE_OVERHEAD = 4
# A picture or a video costs a model-dependent number of tokens; reserve generously.
MEDIA_TOKENS = 1024
# English runs near 4 characters per token; 3 keeps the estimate on the high side.
ASCII_CHARS_PER_TOKEN = 3.0


def text_tokens(text: str) -> int:
    """High-side token estimate: ASCII at 3 chars per token, anything else (CJK...) one per char."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return math.ceil(ascii_chars / ASCII_CHARS_PER_TOKEN) + (len(text) - ascii_chars)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    total = 0
    for part in content or []:
        if isinstance(part, dict) and part.get("type") == "text":
            total += text_tokens(str(part.get("text") or ""))
        else:
            total += MEDIA_TOKENS
    return total


def prompt_tokens(request: dict[str, Any]) -> int:
    total = 0
    for msg in request.get("messages") or []:
        total += PER_MESSAGE_OVERHEAD + _content_tokens(msg.get("content"))
        for key in ("reasoning_content", "name", "tool_call_id"):
            if isinstance(msg.get(key), str):
                total += text_tokens(msg[key])
        if msg.get("tool_calls"):
            total += text_tokens(json.dumps(msg["tool_calls"]))
    if request.get("tools"):
        total += text_tokens(json.dumps(request["tools"]))
    return total


def completion_budget(request: dict[str, Any]) -> int:
    """The output budget Moonshot reserves: ``max_completion_tokens`` (or the model default) per choice."""
    budget = request.get("max_completion_tokens") or request.get("max_tokens")
    if not budget:
        model = str(request.get("model", ""))
        budget = next((n for prefix, n in DEFAULT_COMPLETION_BUDGET if model.startswith(prefix)), None)
    return int(budget or FALLBACK_COMPLETION_BUDGET) * int(request.get("n") or 1)


def reservation(request: dict[str, Any]) -> int:
    """Tokens to reserve against TPM for one call of ``request``."""
    return prompt_tokens(request) + completion_budget(request)
