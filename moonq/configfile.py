"""Operators' configuration files (the tenants file, the accounts file): reading them, and saying what is wrong.

Both files are written by hand and read at start, so a mistake must stop the process with a message
that names the file, the field and the rule (``tenants.search.weight: must be > 0``), and never shows
a value: the accounts file holds API keys, the tenants file webhook secrets. JSON or YAML, chosen by
the extension (``.json``, ``.yaml``, ``.yml``; anything else is tried as JSON, then as YAML). A key
given twice in one object is an error in both formats: their parsers would silently keep the last,
and a tenant or an account written twice is a mistake, never an override.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from moonq.errors import MoonqError

M = TypeVar("M", bound=BaseModel)

_NAME = re.compile(r"[a-z0-9_-]{1,64}")
NAME_RULE = "must be 1 to 64 characters, each a-z, 0-9, _ or -"
_JSON_SUFFIXES, _YAML_SUFFIXES = (".json",), (".yaml", ".yml")
# A YAML parser's message may quote the document (an undefined alias, an unknown tag): quoted runs of
# more than 3 characters are elided, so an unquoted secret cannot reach a log. '\t' or ':' stay.
_QUOTED = re.compile(r"'[^']{4,}'|\"[^\"]{4,}\"")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


class ConfigFileError(MoonqError, ValueError):
    """A configuration file could not be read or broke a rule.

    Attributes:
        setting: the variable that named the file (``MOONQ_TENANTS_FILE``).
        path: the file.
        errors: one ``(field, rule)`` pair per problem; ``field`` is a dotted path such as
            ``tenants.search.weight``, empty for the file as a whole. No value is ever shown.
    """

    def __init__(self, setting: str, path: str | Path, errors: list[tuple[str, str]]) -> None:
        self.setting, self.path, self.errors = setting, str(path), errors
        found = "; ".join(f"{field}: {rule}" if field else rule for field, rule in errors)
        super().__init__(f"{setting} {path}: {found}")


def check_name(name: str) -> str:
    """``name`` as a tenant or account name: it becomes a metric label value and part of Redis keys."""
    if not _NAME.fullmatch(name):
        raise ValueError(NAME_RULE)
    return name


Name = Annotated[str, AfterValidator(check_name)]


def read_mapping(path: str | Path, setting: str) -> dict[str, Any]:
    """The file's top-level object, parsed as JSON or YAML (module docstring).

    Raises:
        ConfigFileError: unreadable, not UTF-8, not JSON or YAML, a key given twice, or not an object.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigFileError(setting, path, [("", f"cannot read the file: {err.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigFileError(setting, path, [("", "is not UTF-8 text")]) from None
    try:
        data = _parse(text, Path(path).suffix.lower())
    except ValueError as err:
        raise ConfigFileError(setting, path, [("", str(err))]) from None
    if not isinstance(data, dict):
        raise ConfigFileError(setting, path, [("", "must hold one object (a mapping) at the top")])
    return data


def validate(model: type[M], data: dict[str, Any], setting: str, path: str | Path) -> M:
    """``data`` as ``model``, or one ``ConfigFileError`` listing every problem found.

    Raises:
        ConfigFileError: naming each field and its rule (unknown fields suggest the closest known one).
    """
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigFileError(setting, path, explain(err, field_names(model))) from None


def field_names(model: type[BaseModel]) -> set[str]:
    """Every field name of ``model`` and of the models nested in it: what an unknown field is compared with."""
    names: set[str] = set()
    pending = [model]
    while pending:
        current = pending.pop()
        for name, info in current.model_fields.items():
            names.add(name)
            pending += [t for t in _nested_models(info.annotation) if t is not current]
    return names


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _nested_models(arg)]


def explain(err: ValidationError, known: Collection[str] = ()) -> list[tuple[str, str]]:
    """``(field, rule)`` for each of pydantic's errors, worded for a person editing the file; never the input."""
    found = []
    for e in err.errors(include_input=False):
        rule = _rule(e["type"], e["msg"], e.get("ctx") or {}, e["loc"], known)
        # pydantic marks a bad dict key with a last "[key]": the name itself broke the rule.
        found.append((_field(e["loc"]), f"the name {rule}" if e["loc"][-1:] == ("[key]",) else rule))
    return found


def _field(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":
            continue  # the path already ends with the name
        if isinstance(part, int):
            text += f"[{part}]"
        elif _SEGMENT.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part[:64])}]"
    return text


# pydantic's error types, worded for a person editing the file ({...}: from the error's context).
_RULES = {
    "missing": "is required",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} items",
    "string_too_short": "must be at least {min_length} characters",
    "string_too_long": "must be at most {max_length} characters",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string (in YAML, quote it)",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object (a mapping)",
    "model_type": "must be an object (a mapping)",
    "model_attributes_type": "must be an object (a mapping)",
}


def _rule(kind: str, msg: str, ctx: dict[str, Any], loc: tuple[int | str, ...], known: Collection[str]) -> str:
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return "is not a known field" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind in _RULES:
        return _RULES[kind].format_map(ctx)
    return msg.removeprefix("Value error, ")


class _DuplicateKey(ValueError):
    pass


def _parse(text: str, suffix: str) -> Any:
    if suffix in _JSON_SUFFIXES:
        return _parse_json(text)
    if suffix in _YAML_SUFFIXES:
        return _parse_yaml(text)
    try:
        return _parse_json(text)
    except _DuplicateKey:
        raise
    except ValueError:
        return _parse_yaml(text)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}") from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"the key {json.dumps(key[:64])} is given twice in one object")
        seen[key] = value
    return seen


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data only, no Python objects), refusing a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # "<<: *anchor": keys written beside it override the merged ones, as YAML says
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"the key {json.dumps(str(key)[:64])} is given twice in one mapping (line {line})")
            keys.append(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = _QUOTED.sub("'…'", err.problem or "syntax error")
        raise ValueError(f"not valid YAML: {where}{problem}") from None
    except yaml.YAMLError:
        raise ValueError("not valid YAML") from None
