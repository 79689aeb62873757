"""What a job was billed over all its attempts: usage summed, the split kept (pure, no I/O).

Every attempt that reached the model's stream is billed: its prompt (a continuation's prompt holds
the text it continues) and what it generated. A job answered by one such attempt keeps the usage
the upstream reported, untouched. A job answered over several (a broken stream resumed or started
over, builtin tool rounds) gets ``usage`` = the sum of them all, and the split under
``moonq.attempts``: per attempt its number, how it ended (``completed``, ``tool_round``, or the
retry reason), whether it continued the attempt before it (``resumed``), its usage, and
``estimated: true`` when the upstream never reported one (the stream broke first, or its usage was
not a count): then the prompt is ``worker/estimate.py``'s estimate of the request sent and the
completion the same estimate of the text received, both on the high side. What Moonshot bills for a
broken stream is not documented (docs/moonshot-api.md §4); this is what the caller saw generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.estimate import prompt_tokens, text_tokens
from worker.usage import token_counts, total_tokens


@dataclass(frozen=True)
class Bill:
    """One billed attempt."""

    attempt: int
    outcome: str  # "completed", "tool_round", or the retry reason that ended it
    resumed: bool  # it continued the attempt before it (Partial Mode)
    usage: dict[str, Any]
    estimated: bool

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attempt": self.attempt, "outcome": self.outcome, "resumed": self.resumed}
        out["usage"] = self.usage
        if self.estimated:
            out["estimated"] = True
        return out


def estimated_usage(request: dict[str, Any], generated: list[str]) -> dict[str, Any]:
    """A high-side usage for a call of ``request`` that generated the text ``generated``."""
    prompt = prompt_tokens(request)
    completion = sum(text_tokens(text) for text in generated)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def bill(
    attempt: int,
    outcome: str,
    *,
    resumed: bool,
    reported: dict[str, Any] | None,
    request: dict[str, Any],
    generated: list[str],
) -> Bill:
    """The bill of one attempt: its reported usage, else an estimate marked as one."""
    if reported is not None:
        return Bill(attempt, outcome, resumed, reported, estimated=False)
    return Bill(attempt, outcome, resumed, estimated_usage(request, generated), estimated=True)


def total_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several usages, cached and reasoning tokens in the spellings the reports used."""
    counts = [token_counts(u) for u in usages]
    prompt = sum(c["prompt"] for c in counts)
    completion = sum(c["completion"] for c in counts)
    total = sum(total_tokens(u) or c["prompt"] + c["completion"] for u, c in zip(usages, counts, strict=True))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    cached = sum(c["cached"] for c in counts)
    if any("cached_tokens" in u for u in usages):
        out["cached_tokens"] = cached
    if any(isinstance(u.get("prompt_tokens_details"), dict) for u in usages):
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if any(isinstance(u.get("completion_tokens_details"), dict) for u in usages):
        out["completion_tokens_details"] = {"reasoning_tokens": sum(c["reasoning"] for c in counts)}
    return out


def settle(result: dict[str, Any], bills: list[Bill]) -> dict[str, Any]:
    """``result`` with the usage of every billed attempt: unchanged when one attempt answered it."""
    if len(bills) <= 1:
        return result
    usage = total_usage([b.usage for b in bills])
    return {**result, "usage": usage, "moonq": {"attempts": [b.entry() for b in bills]}}
