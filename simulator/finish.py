"""Applying ``stop`` and the output budget to a draft: what is actually emitted, and why it ended.

Reasoning, then content, then tool-call arguments draw on one budget, the way a thinking model
spends ``max_completion_tokens`` (docs/moonshot-api.md §9): a budget spent on reasoning leaves empty
content and finish_reason "length".
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.generate import Draft, ToolCall
from simulator.tokens import count, pieces


@dataclass(frozen=True)
class Outcome:
    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    completion_tokens: int


def conclude(draft: Draft, budget: int, stop: tuple[str, ...]) -> Outcome:
    reasoning = pieces(draft.reasoning)
    has_answer = bool(draft.content or draft.tool_calls)
    if len(reasoning) > budget or (len(reasoning) == budget and has_answer):
        return Outcome("".join(reasoning[:budget]), "", (), "length", budget)
    left = budget - len(reasoning)
    content, used, ended = _cut_content(draft.content, left, stop)
    spent = len(reasoning) + used
    if ended or not draft.tool_calls:
        return Outcome(draft.reasoning, content, (), ended or "stop", spent)
    calls, used, truncated = _cut_calls(draft.tool_calls, left - used)
    return Outcome(draft.reasoning, content, calls, "length" if truncated else "tool_calls", spent + used)


def _cut_content(text: str, left: int, stop: tuple[str, ...]) -> tuple[str, int, str | None]:
    """Returns (emitted text, its tokens, "stop"/"length" if cut early else None)."""
    parts = pieces(text)
    budget_end = len(text) if len(parts) <= left else len("".join(parts[:left]))
    # The stop string that is complete first wins; its text is not returned.
    hits = [(at + len(s), at) for s in stop if (at := text.find(s)) >= 0]
    if hits and min(hits)[0] <= budget_end:
        emitted = text[: min(hits)[1]]
        return emitted, count(emitted), "stop"
    if len(parts) > left:
        return text[:budget_end], left, "length"
    return text, len(parts), None


def _cut_calls(calls: tuple[ToolCall, ...], left: int) -> tuple[tuple[ToolCall, ...], int, bool]:
    kept: list[ToolCall] = []
    used = 0
    for call in calls:
        parts = pieces(call.arguments)
        if len(parts) > left - used:
            # The budget ran out inside the arguments: the client gets invalid JSON, as it would.
            cut = "".join(parts[: left - used])
            return (*kept, ToolCall(call.id, call.name, cut, call.type)), left, True
        kept.append(call)
        used += len(parts)
    return tuple(kept), used, False
