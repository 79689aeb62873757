"""Plausible values for a JSON schema: tool-call arguments and ``json_schema`` answers."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from simulator.words import VOCABULARY, phrase

CITIES = ("Beijing", "Shanghai", "Shenzhen", "Hangzhou", "Singapore", "Tokyo", "Paris", "Berlin")
PEOPLE = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "Emmy Noether")


def schema_value(schema: Any, rng: random.Random, name: str = "") -> Any:
    """A value that validates against the subset of JSON Schema tools and answers use."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema_value(schema[key][0], rng, name)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first non-null type
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in schema:
        kind = "object"
    generate = _BY_TYPE.get(kind, _string) if isinstance(kind, str) else _string
    return generate(schema, rng, name)


def _bound(schema: dict[str, Any], key: str, default: int) -> int:
    # Schemas come from clients: ignore non-numeric bounds and clamp huge ones so output stays small.
    value = schema.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(max(-(10**9), min(value, 10**9)))


def _object(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    properties: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required")
    keys = [k for k in required if isinstance(k, str)] if isinstance(required, list) and required else list(properties)
    return {key: schema_value(properties.get(key, {"type": "string"}), rng, key) for key in keys}


def _array(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    low = min(max(_bound(schema, "minItems", 1), 0), 8)
    high = max(low, min(_bound(schema, "maxItems", 2), 2))
    item_name = name[:-1] if name.endswith("s") else name
    items = schema.get("items", {"type": "string"})
    return [schema_value(items, rng, item_name) for _ in range(rng.randint(low, high))]


def _integer(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    low = _bound(schema, "minimum", 0)
    return rng.randint(low, max(low, _bound(schema, "maximum", low + 100)))


def _number(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    low = _bound(schema, "minimum", 0)
    return round(rng.uniform(low, max(low, _bound(schema, "maximum", low + 100))), 2)


def _string(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    text = _string_by_hint(schema.get("format"), name.lower(), rng)
    min_length = min(_bound(schema, "minLength", 0), 256)
    while len(text) < min_length:
        text += " " + rng.choice(VOCABULARY)
    max_length = _bound(schema, "maxLength", len(text))
    return text[: max(max_length, min_length)]


def _string_by_hint(fmt: Any, name: str, rng: random.Random) -> str:
    if fmt == "date-time":
        return f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:00:00Z"
    if fmt == "date" or "date" in name:
        return f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
    if fmt == "email" or "email" in name:
        return f"{rng.choice(VOCABULARY)}@example.com"
    if fmt == "uri" or "url" in name:
        return f"https://example.com/{rng.choice(VOCABULARY)}"
    if "city" in name or "location" in name:
        return rng.choice(CITIES)
    if "name" in name:
        return rng.choice(PEOPLE)
    return phrase(rng, rng.randint(2, 4))


def _boolean(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    return rng.random() < 0.5


def _null(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    return None


_BY_TYPE: dict[str, Callable[[dict[str, Any], random.Random, str], Any]] = {
    "object": _object,
    "array": _array,
    "integer": _integer,
    "number": _number,
    "string": _string,
    "boolean": _boolean,
    "null": _null,
}
