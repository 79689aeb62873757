"""Validation of ``tools`` and ``tool_choice``, including the "Moonshot flavored JSON Schema" rules.

The MFJS messages are the live texts reported against the real API (docs/moonshot-api.md §6, I9).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from simulator.catalog import ModelSpec, Thinking
from simulator.errors import invalid_request, rejected

MAX_TOOLS = 128
TOOL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_-]{2,63}")
WEB_SEARCH = "$web_search"
BUILTINS = frozenset({WEB_SEARCH})

Tool = dict[str, Any]


def tool_name(tool: Tool) -> str:
    return str(tool["function"]["name"])


def check_tools(raw: Any) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_request("tools must be a list")
    if len(raw) > MAX_TOOLS:
        raise invalid_request(f"too many tools: {len(raw)}, at most {MAX_TOOLS} are allowed")
    for i, tool in enumerate(raw):
        _check_tool(i, tool)
    return raw


def check_tool_choice(raw: Any, tools: Sequence[Tool], spec: ModelSpec, thinking: bool) -> tuple[str, str | None]:
    """Returns ``(mode, forced_name)``; mode is auto, none, required or specified."""
    if raw is None or raw in ("auto", "none"):
        return raw or "auto", None
    if raw == "required":
        # K3 reasons before a required call; the other thinking models reject it (inspect_ai#5152).
        if thinking and spec.thinking is not Thinking.EFFORT:
            raise rejected("tool_choice 'required' is incompatible with thinking enabled")
        if not tools:
            raise invalid_request("tool_choice 'required' needs at least one tool")
        return "required", None
    function = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    if not isinstance(function, dict):
        raise invalid_request("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', ...}")
    if thinking:
        raise rejected("tool_choice 'specified' is incompatible with thinking enabled")
    name = function.get("name")
    if not isinstance(name, str) or name not in {tool_name(tool) for tool in tools}:
        raise invalid_request(f"tool_choice names the function {name!r}, which is not in tools")
    return "specified", name


def _check_tool(i: int, tool: Any) -> None:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict):
        raise invalid_request(f"tools[{i}] must be an object with a function")
    name = function.get("name")
    if tool.get("type") == "builtin_function":
        if not isinstance(name, str) or name not in BUILTINS:
            raise invalid_request(f"unknown builtin_function {name!r}")
        return
    if tool.get("type") != "function":
        raise invalid_request(f"tools[{i}].type must be 'function' or 'builtin_function'")
    if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
        raise invalid_request(f"tool name {name!r} is invalid, it must match ^[a-zA-Z_][a-zA-Z0-9-_]{{2,63}}$")
    if "parameters" in function:
        _check_parameters(function["parameters"])


def _check_parameters(schema: Any) -> None:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise invalid_request('tools.function.parameters.type is required and must be "object"')
    _check_node(schema, "root")


def _mfjs_error(path: str, detail: str) -> Exception:
    return invalid_request(
        f"tools.function.parameters is not a valid moonshot flavored json schema, details: <At path '{path}': {detail}>"
    )


def _check_node(node: dict[str, Any], path: str) -> None:
    if "anyOf" in node and "type" in node:
        raise _mfjs_error(path, "when using anyOf, type should be defined in anyOf items instead of the parent schema")
    for key, child in _children(node):
        child_path = key if path == "root" else f"{path}.{key}"
        if not isinstance(child, dict):
            raise _mfjs_error(path, f"schema for '{key}' must be an object")
        _check_node(child, child_path)
    properties = node.get("properties")
    if isinstance(properties, dict):
        props_path = "properties" if path == "root" else f"{path}.properties"
        for name, child in properties.items():
            if not isinstance(child, dict):
                raise _mfjs_error(props_path, f"property schema for '{name}' must be an object")
            _check_node(child, f"{props_path}.{name}")


def _children(node: dict[str, Any]) -> list[tuple[str, Any]]:
    # Sub-schemas other than properties: items, the combinators and additionalProperties.
    out: list[tuple[str, Any]] = []
    if "items" in node:
        out.append(("items", node["items"]))
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(key), list):
            out += [(f"{key}.{i}", sub) for i, sub in enumerate(node[key])]
    if isinstance(node.get("additionalProperties"), dict):
        out.append(("additionalProperties", node["additionalProperties"]))
    return out
