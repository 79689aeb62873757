"""What the model "says": a deterministic draft per choice, before stop strings and the budget apply.

The draft depends only on the seed, the model, the messages, whether tools are offered and the
choice index (plus the requested output shape), never on ``stop``, ``max_completion_tokens`` or
``stream``: a test can read an answer, then pick one of its words as a stop string and see the
same answer cut just before it.

Partial Mode continues an answer the way a deterministic model would: when the prefix is the
beginning of what the model answers to the conversation without the partial message (a stream
that broke and is resumed), the continuation is the rest of that very answer; when it is the
caller's own prefix followed by the beginning of its continuation (a resumed Partial Mode
request), likewise. Any other prefix gets a fresh continuation. So a resumed answer equals the
answer an unbroken stream would have given.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace

from simulator.config import SimConfig
from simulator.jsongen import schema_value
from simulator.messages import partial_prefix
from simulator.tokens import compact_json
from simulator.tooldefs import WEB_SEARCH, Tool, tool_name
from simulator.validate import ChatRequest
from simulator.words import prose, sentence

# k3 reasons longer the more effort is asked for.
_EFFORT_SCALE = {"low": 0.5, "high": 1.0, "max": 2.0}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    # A builtin ($web_search) comes back typed as it was declared (docs/moonshot-api.md §6).
    type: str = "function"


@dataclass(frozen=True)
class Draft:
    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


def draft(cfg: SimConfig, req: ChatRequest, index: int) -> Draft:
    prefix = partial_prefix(req.messages)
    if prefix:
        resumed = _resumed(cfg, req, index, prefix)
        if resumed is not None:
            return resumed
    return _fresh(cfg, req, index, prefix)


def _fresh(cfg: SimConfig, req: ChatRequest, index: int, prefix: str | None) -> Draft:
    rng = _rng(cfg.seed, req, index)
    # Partial Mode continues the answer text itself, so no new reasoning precedes it.
    reasoning = prose(rng, _reasoning_length(cfg, req, rng)) if req.thinking and prefix is None else ""
    tool = _tool_to_call(req)
    if tool is not None:
        return Draft(reasoning, "", (_tool_call(tool, req, rng),))
    if req.response_format is not None:
        return Draft(reasoning, _json_answer(req, rng))
    return Draft(reasoning, _continue(prefix, prose(rng, rng.randint(*cfg.answer_tokens))))


def _resumed(cfg: SimConfig, req: ChatRequest, index: int, prefix: str) -> Draft | None:
    """The rest of the answer whose beginning ``prefix`` is, if it is one (see the module docstring)."""
    if len(req.messages) < 2:
        return None
    earlier, last = req.messages[:-1], req.messages[-1]
    whole = draft(cfg, replace(req, messages=earlier), index)
    if not whole.tool_calls and whole.content.startswith(prefix):
        return Draft("", whole.content[len(prefix) :])
    # A continuation begins at a space, or right after one (``_continue``): only there can the
    # caller's own prefix have ended.
    for cut in range(1, len(prefix)):
        if prefix[cut] != " " and not prefix[cut - 1].isspace():
            continue
        head = prefix[:cut]
        told = _fresh(cfg, replace(req, messages=[*earlier, {**last, "content": head}]), index, head).content
        if (head + told).startswith(prefix):
            return Draft("", (head + told)[len(prefix) :])
    return None


def _rng(seed: int, req: ChatRequest, index: int) -> random.Random:
    material = compact_json([seed, req.model, req.messages, bool(req.tools), index])
    return random.Random(int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big"))


def _reasoning_length(cfg: SimConfig, req: ChatRequest, rng: random.Random) -> int:
    length = rng.randint(*cfg.reasoning_tokens)
    return max(2, round(length * _EFFORT_SCALE.get(req.reasoning_effort or "high", 1.0)))


def _tool_to_call(req: ChatRequest) -> Tool | None:
    if not req.tools or req.tool_choice == "none":
        return None
    if req.forced_tool is not None:
        return next(tool for tool in req.tools if tool_name(tool) == req.forced_tool)
    # The model calls a tool in reply to the user and answers in text once it has the result.
    if req.tool_choice == "required" or req.messages[-1]["role"] == "user":
        return req.tools[0]
    return None


def _tool_call(tool: Tool, req: ChatRequest, rng: random.Random) -> ToolCall:
    name = tool_name(tool)
    # Ids count the calls so far in the conversation ("search:0", "search:1", ...) and stay unique.
    number = sum(len(m.get("tool_calls") or ()) for m in req.messages if m["role"] == "assistant")
    if name == WEB_SEARCH:
        search = {
            "search_result": {"search_id": f"{rng.getrandbits(64):016x}"},
            "usage": {"total_tokens": rng.randint(500, 3000)},
        }
        arguments = json.dumps(search, ensure_ascii=False)
        return ToolCall(f"{name}:{number}", name, arguments, type="builtin_function")
    else:
        parameters = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        arguments = json.dumps(schema_value(parameters, rng), ensure_ascii=False)
    return ToolCall(f"{name}:{number}", name, arguments)


def _json_answer(req: ChatRequest, rng: random.Random) -> str:
    assert req.response_format is not None
    kind, schema = req.response_format
    if kind == "json_schema":
        return json.dumps(schema_value(schema, rng), ensure_ascii=False)
    return json.dumps(
        {"answer": sentence(rng, rng.randint(6, 14)), "confidence": round(rng.random(), 2)}, ensure_ascii=False
    )


def _continue(prefix: str | None, text: str) -> str:
    # A continuation reads on from the prefix: mid-sentence it starts lower-case after a space.
    if not prefix:
        return text
    if prefix[-1] not in ".!?\n":
        text = text[0].lower() + text[1:]
    return text if prefix[-1].isspace() else " " + text
