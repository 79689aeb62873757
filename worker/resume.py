"""Resuming a broken answer with Partial Mode, or starting it over: pure decisions, no I/O.

When a stream breaks after part of the answer reached the subscribers, moonq can ask the API to
continue that very text instead of writing a new answer: the next attempt sends the same request
plus an assistant message holding the text so far with ``"partial": true`` (or, when the caller's
request already ended in such a message, the text so far appended to its prefix), and the API
answers with what follows the prefix, never the prefix again (docs/moonshot-api.md §5). The deltas
already published stand; the ``retry`` event says so (``resume``, ``kept``).

Where Partial Mode cannot continue the answer faithfully, the answer starts over, as before, and
the event names why (``restart_reason``):

- ``resume_off``: ``MOONQ_RESUME=restart``;
- ``several_choices``: ``n`` > 1: a partial message continues one answer, not several;
- ``json_mode``: ``response_format`` json_object (the API refuses it with Partial Mode) or
  json_schema (not documented with it: a schema the prefix was not generated under could change
  the answer);
- ``tool_call``: a tool call had begun to stream: a call cannot be given as a prefix;
- ``reasoning_unfinished``: a thinking model was still reasoning: Partial Mode continues the answer
  text, and a prefix without its end of reasoning would make the model answer without it;
- ``answer_finished``: the choice had its finish_reason before the stream broke: continuing a
  finished answer could only add to it;
- ``stop_word``: the text ends with the beginning of a stop word: the API looks for stop words in
  what it generates, so a stop word split by the break would go unnoticed;
- ``budget_spent``: nothing of the caller's token budget is left for a continuation;
- ``prefix_not_text``: the caller's partial message holds content parts, not a string.

The continuation keeps the caller's budget: ``max_completion_tokens`` (or ``max_tokens``, whichever
the caller wrote) shrinks by one token per streamed text fragment (every fragment holds at least
one token), so a resumed answer is never cut shorter than the caller's budget allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PARTIAL, RESTART = "partial", "restart"
RESUME_MODES = (PARTIAL, RESTART)

RESUME_OFF = "resume_off"
SEVERAL_CHOICES = "several_choices"
JSON_MODE = "json_mode"
TOOL_CALL = "tool_call"
REASONING_UNFINISHED = "reasoning_unfinished"
ANSWER_FINISHED = "answer_finished"
STOP_WORD = "stop_word"
BUDGET_SPENT = "budget_spent"
PREFIX_NOT_TEXT = "prefix_not_text"
BUDGET_KEYS = ("max_completion_tokens", "max_tokens")


@dataclass
class Streamed:
    """What the subscribers were sent of the current answer since it last started over.

    Choice 0's text is kept whole (only a single-choice answer is ever continued); the rest is
    what a decision needs: whether anything visible went out, whether a tool call began, how many
    text fragments were generated (each at least one token), and this attempt's text, for an
    estimate of its usage when the upstream never reported one.
    """

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    visible: bool = False
    tool_call: bool = False
    fragments: int = 0
    attempt_text: list[str] = field(default_factory=list)

    def add(self, index: int, delta: dict[str, Any]) -> None:
        """One published delta of choice ``index``."""
        texts = [(k, v) for k in ("content", "reasoning_content") if isinstance(v := delta.get(k), str) and v]
        if texts:
            self.visible = True
            self.fragments += 1
        for key, value in texts:
            self.attempt_text.append(value)
            if index == 0:
                (self.content if key == "content" else self.reasoning).append(value)
        calls = delta.get("tool_calls")
        if calls:
            self.visible = self.tool_call = True
            self.attempt_text.append(json.dumps(calls, ensure_ascii=False))

    def new_attempt(self) -> None:
        self.attempt_text = []

    def text(self) -> str:
        return "".join(self.content)

    def reasoning_text(self) -> str:
        return "".join(self.reasoning)


@dataclass(frozen=True)
class Decision:
    """Resume or start over after a break, and what the ``retry`` event says about it."""

    resume: bool
    kept: int = 0  # characters of content that stand (on a resume)
    restart_reason: str | None = None  # why an answer that had begun to stream starts over

    def event_fields(self) -> dict[str, Any]:
        """The ``retry`` event's ``resume``, ``kept`` and ``restart_reason`` (None = left out)."""
        return {
            "resume": self.resume,
            "kept": self.kept if self.resume else None,
            "restart_reason": self.restart_reason,
        }


def decide(base: dict[str, Any], streamed: Streamed, *, finished: bool, mode: str) -> Decision:
    """After a break: continue ``base``'s answer from what was streamed, or start it over.

    Args:
        base: the request the answer was begun with (before any Partial Mode continuation).
        streamed: what the subscribers were sent of the answer.
        finished: whether any choice had its finish_reason before the break.
        mode: ``MOONQ_RESUME`` (``partial`` or ``restart``).
    """
    if not streamed.visible:
        return Decision(resume=False)  # nothing was shown: starting over takes nothing back
    why = _why_not(base, streamed, finished=finished, mode=mode)
    if why is not None:
        return Decision(resume=False, restart_reason=why)
    return Decision(resume=True, kept=len(streamed.text()))


def _why_not(base: dict[str, Any], streamed: Streamed, *, finished: bool, mode: str) -> str | None:
    fmt = base.get("response_format")
    left = _budget_left(base, streamed)
    checks = (
        (mode != PARTIAL, RESUME_OFF),
        (int(base.get("n") or 1) > 1, SEVERAL_CHOICES),
        (isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"), JSON_MODE),
        (streamed.tool_call, TOOL_CALL),
        (finished, ANSWER_FINISHED),
        (not streamed.content, REASONING_UNFINISHED),
        (not _prefix_is_text(base), PREFIX_NOT_TEXT),
        (_straddles_stop_word(streamed.text(), base.get("stop")), STOP_WORD),
        (left is not None and left < 1, BUDGET_SPENT),
    )
    return next((why for broken, why in checks if broken), None)


def _partial_message(base: dict[str, Any]) -> dict[str, Any] | None:
    messages = base.get("messages") or []
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant" and last.get("partial") is True:
        return last
    return None


def _prefix_is_text(base: dict[str, Any]) -> bool:
    last = _partial_message(base)
    return last is None or last.get("content") is None or isinstance(last.get("content"), str)


def _straddles_stop_word(text: str, stop: Any) -> bool:
    """Whether ``text`` ends with a proper beginning of a stop word (the rest may follow the break)."""
    words = [stop] if isinstance(stop, str) else [w for w in stop or [] if isinstance(w, str)]
    return any(text.endswith(word[:k]) for word in words for k in range(1, len(word)))


def _budget_left(base: dict[str, Any], streamed: Streamed) -> int | None:
    """The caller's budget less what was generated; None when the caller set none."""
    key = next((k for k in BUDGET_KEYS if base.get(k) is not None), None)
    return None if key is None else int(base[key]) - streamed.fragments


def continuation(base: dict[str, Any], streamed: Streamed) -> dict[str, Any]:
    """``base`` continued from the streamed text with Partial Mode (docs/moonshot-api.md §5).

    The text so far becomes (or extends) the final assistant message with ``"partial": true``;
    a thinking model's finished reasoning goes with it as ``reasoning_content``. The budget the
    caller set shrinks by what was generated; a request that set none gets the model's default.
    """
    body = dict(base)
    messages = list(base["messages"])
    content, reasoning = streamed.text(), streamed.reasoning_text()
    last = _partial_message(base)
    if last is not None:
        message = {**last, "content": (last.get("content") or "") + content}
        if reasoning:
            message["reasoning_content"] = (last.get("reasoning_content") or "") + reasoning
        messages[-1] = message
    else:
        message = {"role": "assistant", "content": content, "partial": True}
        if reasoning:
            message["reasoning_content"] = reasoning
        messages.append(message)
    body["messages"] = messages
    for key in BUDGET_KEYS:
        if base.get(key) is not None:
            body[key] = int(base[key]) - streamed.fragments
    return body


def merge(completion: dict[str, Any], content: str, reasoning: str) -> dict[str, Any]:
    """A continuation's completion with the text that stood before it in front of choice 0's own."""
    if not content and not reasoning:
        return completion
    choices = [dict(c) for c in completion.get("choices") or []]
    if choices:
        message = dict(choices[0].get("message") or {})
        message["content"] = content + (message.get("content") or "")
        if reasoning:
            message["reasoning_content"] = reasoning + (message.get("reasoning_content") or "")
        choices[0]["message"] = message
    return {**completion, "choices": choices}
