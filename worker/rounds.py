"""Builtin tool rounds run by the worker (``builtin_tools="auto"``): pure decisions, no I/O.

Moonshot's builtin tools (``$web_search``) run on Moonshot's side, but the client closes the loop:
the model answers ``finish_reason: "tool_calls"`` with a call named ``$web_search``, and the next
request carries that assistant message unchanged plus one tool message per call whose content is
the call's ``arguments``, as received (docs/moonshot-api.md §6). With the option on, the worker
makes that next request itself, so the job's result is the final answer; each round is a ``retry``
event with reason ``tool_round``, and its usage is billed like any attempt's (worker/billing.py).

A round follows only when every call of the answer is a builtin one: with a function of the
caller's among them, the caller must run it, so the answer is returned as it is. After
``MAX_TOOL_ROUNDS`` rounds the answer is returned as it is too (a model that searches forever
must not spend the caller's money forever).
"""

from __future__ import annotations

from typing import Any

MAX_TOOL_ROUNDS = 8
TOOL_ROUND = "tool_round"


def offers_builtin(request: dict[str, Any]) -> bool:
    """Whether the request offers a builtin tool (only then can a builtin round follow)."""
    tools = request.get("tools")
    return isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") == "builtin_function" for t in tools)


def _is_builtin(call: Any) -> bool:
    if not isinstance(call, dict):
        return False
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    name = fn.get("name") if isinstance(fn, dict) else None
    return call.get("type") == "builtin_function" or (isinstance(name, str) and name.startswith("$"))


def builtin_calls(completion: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The builtin calls of a one-choice answer that asks only for builtin tools; else None."""
    choices = completion.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") != "tool_calls":
        return None
    calls = (choices[0].get("message") or {}).get("tool_calls") or []
    if not calls or not all(_is_builtin(c) and c.get("id") for c in calls):
        return None
    return list(calls)


def next_round(request: dict[str, Any], completion: dict[str, Any]) -> dict[str, Any] | None:
    """The request that closes the builtin calls of ``completion``; None when no round follows."""
    calls = builtin_calls(completion)
    messages = request.get("messages") or []
    if calls is None or (messages and messages[-1].get("partial") is True):
        return None
    message = completion["choices"][0]["message"]
    # The assistant message goes back as it came (reasoning_content included: a thinking model needs it).
    assistant = {key: value for key, value in message.items() if value is not None}
    assistant["content"] = message.get("content") or ""
    answers = [
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "name": call["function"]["name"],
            "content": call["function"].get("arguments") or "",
        }
        for call in calls
    ]
    return {**request, "messages": [*messages, assistant, *answers]}
