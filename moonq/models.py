"""What each Moonshot model accepts, checked before a job is enqueued: one table, sources in the docs.

A request that breaks a documented per-model rule would queue, wait for quota and then fail with a
400; it is refused at submit instead, naming the field and the rule. The rules and their sources
are in docs/moonshot-api.md §2 and §9 (the table under "Per-model rules"). A model that is not in the
table (a new one, a dated variant, another OpenAI-compatible upstream's) is checked by none of
them: the upstream decides, as it does for unknown fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moonq.errors import InvalidRequest


class Thinking(Enum):
    """Whether a model reasons, and what its ``thinking`` field may say."""

    NEVER = "never"  # no reasoning (moonshot-v1, the K2 previews)
    ALWAYS = "always"  # kimi-k2-thinking*: reasons whatever the request says
    DEFAULT_ON = "default_on"  # k2.5/k2.6: on unless thinking.type is "disabled"
    ENABLED_ONLY = "enabled_only"  # k2.7-code: "disabled" is a 400
    EFFORT = "effort"  # k3: always on, depth set by reasoning_effort


@dataclass(frozen=True)
class ModelRules:
    thinking: Thinking = Thinking.NEVER
    # k2.5/k2.6 pin temperature (1.0 thinking, 0.6 not), top_p 0.95, n 1 and both penalties 0.
    fixed_sampling: bool = False


# Exact ids only: a prefix would also catch a later model whose rules may differ.
MODELS: dict[str, ModelRules] = {
    "kimi-k3": ModelRules(Thinking.EFFORT),
    "kimi-k2.7-code": ModelRules(Thinking.ENABLED_ONLY),
    "kimi-k2.7-code-highspeed": ModelRules(Thinking.ENABLED_ONLY),
    "kimi-k2.6": ModelRules(Thinking.DEFAULT_ON, fixed_sampling=True),
    "kimi-k2.5": ModelRules(Thinking.DEFAULT_ON, fixed_sampling=True),
    "kimi-k2-thinking": ModelRules(Thinking.ALWAYS),
    "kimi-k2-thinking-turbo": ModelRules(Thinking.ALWAYS),
    "kimi-k2-0905-preview": ModelRules(),
    "kimi-k2-0711-preview": ModelRules(),
    "kimi-k2-turbo-preview": ModelRules(),
    "kimi-latest": ModelRules(),
    "moonshot-v1-8k": ModelRules(),
    "moonshot-v1-32k": ModelRules(),
    "moonshot-v1-128k": ModelRules(),
    "moonshot-v1-auto": ModelRules(),
    "moonshot-v1-8k-vision-preview": ModelRules(),
    "moonshot-v1-32k-vision-preview": ModelRules(),
    "moonshot-v1-128k-vision-preview": ModelRules(),
}
# "When temperature is very small and close to 0, only 1 result can be returned" (the API reference).
NEAR_ZERO_TEMPERATURE = 0.01
PINNED_TOP_P = 0.95


@dataclass(frozen=True)
class Sampling:
    """The fields of a request the per-model rules look at, as the caller set them (None = not set)."""

    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    thinking: str | None = None  # thinking.type: "enabled" | "disabled"
    tool_choice: str | None = None  # "auto" | "none" | "required" | "named"


def thinks(rules: ModelRules, thinking: str | None) -> bool:
    """Whether a request for a model with ``rules`` and ``thinking.type`` reasons before it answers."""
    if rules.thinking is Thinking.DEFAULT_ON:
        return thinking != "disabled"
    return rules.thinking is not Thinking.NEVER


def model_problem(model: str, sampling: Sampling) -> tuple[str, str] | None:
    """The first documented per-model rule the request breaks, as ``(field, rule)``; None if none."""
    rules = MODELS.get(model)
    if rules is None:
        return None
    if rules.thinking is Thinking.ENABLED_ONLY and sampling.thinking == "disabled":
        return "thinking.type", f"{model} only thinks: 'disabled' is refused by the API"
    thinking = thinks(rules, sampling.thinking)
    if rules.fixed_sampling:
        problem = _pinned(model, sampling, thinking)
        if problem is not None:
            return problem
    n, temperature = sampling.n or 1, sampling.temperature
    if n > 1 and temperature is not None and temperature < NEAR_ZERO_TEMPERATURE:
        return "n", f"more than one answer needs a temperature of at least {NEAR_ZERO_TEMPERATURE} (got {temperature})"
    forced = sampling.tool_choice == "named" or (
        sampling.tool_choice == "required" and rules.thinking is not Thinking.EFFORT
    )
    if thinking and forced:
        return "tool_choice", f"{model} refuses a forced tool choice while thinking: use auto or none"
    return None


def _pinned(model: str, sampling: Sampling, thinking: bool) -> tuple[str, str] | None:
    mode = "with thinking" if thinking else "without thinking"
    wanted: dict[str, float] = {
        "temperature": 1.0 if thinking else 0.6,
        "top_p": PINNED_TOP_P,
        "n": 1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    for name, value in wanted.items():
        got = getattr(sampling, name)
        if got is not None and got != value:
            return name, f"{model} accepts only {value:g} {mode}, or the field left out (got {got!r})"
    return None


# The request options that travel beside the body, never in it: how the worker handles builtin tools.
BUILTIN_TOOLS_MODES = ("auto",)


def check_builtin_tools(value: object, n: int | None, field: str = "builtin_tools") -> str | None:
    """The ``builtin_tools`` option (None = off), checked against the request's ``n``.

    ``"auto"``: the worker runs the echo round trip of Moonshot's builtin tools (``$web_search``)
    itself, so the job's result is the final answer (docs/moonshot-api.md §6). One conversation per
    job only: with ``n`` > 1 every answer would need tool rounds of its own.

    Raises:
        InvalidRequest: naming ``field``.
    """
    if value is None:
        return None
    if not isinstance(value, str) or value not in BUILTIN_TOOLS_MODES:
        shown = value[:40] if isinstance(value, str) else value
        raise InvalidRequest([(field, f"must be one of {', '.join(BUILTIN_TOOLS_MODES)} (got {shown!r})")])
    if (n or 1) > 1:
        raise InvalidRequest([(field, "needs n = 1: each of several answers would need tool rounds of its own")])
    return value
