"""The chat-completions request, validated the way Moonshot documents it.

Strict on what we know, open to what we don't: every documented field is checked (type,
range, size) and a mistake raises ``InvalidRequest`` naming the field and the rule;
fields we do not know pass through to the upstream unchanged, because the API grows
faster than this file. Known or not, every value must be plain JSON that any peer can carry
(``json_problem``: no NaN, no lone surrogate, no 65-bit integer, at most 64 levels deep).
``to_payload()`` returns exactly what the caller set, as the caller wrote it: defaults are never
injected, no value is coerced (``"stream": "false"`` is refused, not sent as false), and the
deprecated ``max_tokens`` is sent as ``max_tokens`` (an upstream that honours only one of the two
spellings would otherwise apply a different cap than the one asked for; docs/moonshot-api.md §2).
Documented per-model rules (moonq/models.py) are checked too, for the models they name.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError, to_json

from moonq.errors import InvalidRequest
from moonq.jsonsafe import MAX_JSON_DEPTH, MAX_JSON_INT, field_path, json_problem
from moonq.models import Sampling, model_problem

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT",
    "MAX_REQUEST_BYTES",
    "MAX_STOP_BYTES",
    "ChatRequest",
    "field_path",
    "json_problem",
    "validate_request",
]

MAX_STOP_WORDS = 5
MAX_STOP_BYTES = 32
MAX_TOOLS = 128
# Matched whole (fullmatch): with re.match, "$" also matches before a trailing newline ("get_weather\n").
TOOL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9\-_]{2,63}")
ROLES = ("system", "user", "assistant", "tool")
# Formats Moonshot accepts inside base64 data URLs (docs/moonshot-api.md §2).
IMAGE_TYPES = ("png", "jpeg", "jpg", "webp", "gif")
VIDEO_TYPES = ("mp4", "mpeg", "mov", "quicktime", "avi", "x-msvideo", "x-flv", "mpg", "webm", "wmv", "x-ms-wmv", "3gpp")

Unit = Annotated[float, Field(strict=True, ge=0, le=1)]
Penalty = Annotated[float, Field(strict=True, ge=-2, le=2)]


class _Open(BaseModel):
    # Unknown fields are kept and sent on: the upstream decides about them.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _check_media_url(url: Any, kind: str) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError(f"{kind}.url: is required (a base64 data URL or ms://<file_id>)")
    if url.startswith("ms://"):
        if len(url) == len("ms://"):
            raise ValueError(f"{kind}.url: ms:// needs a file id")
        return url
    media = "image" if kind == "image_url" else "video"
    allowed = IMAGE_TYPES if media == "image" else VIDEO_TYPES
    match = re.match(rf"data:{media}/([\w.+-]+);base64,.", url)
    if match is None:
        raise ValueError(
            f"{kind}.url: must be a base64 data URL (data:{media}/<type>;base64,...) or ms://<file_id>;"
            " remote http(s) URLs are not supported"
        )
    if match.group(1).lower() not in allowed:
        raise ValueError(f"{kind}.url: type {match.group(1)!r} is not one of {', '.join(allowed)}")
    return url


class ContentPart(_Open):
    """One part of a multimodal message: text, image_url or video_url."""

    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: dict[str, Any] | str | None = None
    video_url: dict[str, Any] | str | None = None

    @model_validator(mode="after")
    def _payload_matches_type(self) -> ContentPart:
        if self.type == "text":
            if not isinstance(self.text, str):
                raise ValueError("text: a text part needs a 'text' string")
            if not self.text:
                # Refused by the API ("text content is empty", docs/moonshot-api.md §2), even beside other parts.
                raise ValueError("text: must not be empty (leave the part out instead)")
            return self
        ref = self.image_url if self.type == "image_url" else self.video_url
        if ref is None:
            raise ValueError(f"{self.type}: an {self.type} part needs an '{self.type}' object with a url")
        _check_media_url(ref.get("url") if isinstance(ref, dict) else ref, self.type)
        return self


def _content_is_empty(content: str | list[ContentPart] | None) -> bool:
    if content is None:
        return True
    if isinstance(content, str):
        return content == ""
    return len(content) == 0 or all(p.type == "text" and not p.text for p in content)


class ToolCallFunction(_Open):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Open):
    id: str = Field(min_length=1)
    # A $web_search call may come back typed builtin_function; it is sent back unchanged (§6).
    type: Literal["function", "builtin_function"] = "function"
    function: ToolCallFunction


class Message(_Open):
    """A chat message; the rules differ per role (see ``_rules_for_role``)."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    partial: StrictBool | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"must be one of {', '.join(ROLES)} (got {role!r})")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content: Any) -> Any:
        if content is not None and not isinstance(content, str | list):
            raise ValueError("must be a string or a list of content parts")
        return content

    @model_validator(mode="after")
    def _rules_for_role(self) -> Message:
        if self.partial and self.role != "assistant":
            raise ValueError("partial: is only allowed on an assistant message")
        if self.role == "assistant":
            # An empty tool_calls list is no call: such a message is empty, and the API refuses it.
            if not self.tool_calls and not self.partial and _content_is_empty(self.content):
                raise ValueError("content: must not be empty (unless the message has tool_calls or partial)")
        elif _content_is_empty(self.content):
            raise ValueError("content: must not be empty")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: is required on a tool message")
        if self.role != "assistant" and self.tool_calls is not None:
            raise ValueError("tool_calls: only an assistant message may carry them")
        return self


class FunctionDef(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Open):
    """A tool the model may call: a ``function`` or a ``builtin_function`` such as ``$web_search``."""

    type: Literal["function", "builtin_function"]
    function: FunctionDef

    @model_validator(mode="after")
    def _valid_function(self) -> Tool:
        name = self.function.name
        if self.type == "builtin_function":
            if not name.startswith("$"):
                raise ValueError(f"function.name: a builtin_function name starts with '$' (got {name!r})")
            return self
        if not TOOL_NAME_RE.fullmatch(name):
            raise ValueError(f"function.name: {name!r} does not match ^{TOOL_NAME_RE.pattern}$")
        params = self.function.parameters
        if params is not None and params.get("type") != "object":
            raise ValueError("function.parameters: must be a JSON schema whose root type is 'object'")
        return self


class JsonSchemaSpec(_Open):
    name: str = Field(min_length=1)
    strict: StrictBool | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: is required when type is json_schema ({name, schema})")
        return self


class Thinking(_Open):
    type: Literal["enabled", "disabled"]
    keep: Literal["all"] | None = None


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, str]


class ChatRequest(_Open):
    """A complete ``POST /v1/chat/completions`` body."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, strict=True, ge=1)
    # Deprecated by the API but still documented; sent as written, never renamed (see the module docstring).
    max_tokens: int | None = Field(default=None, strict=True, ge=1)
    temperature: Unit | None = None
    top_p: Unit | None = None
    n: int | None = Field(default=None, strict=True, ge=1, le=5)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    thinking: Thinking | None = None
    reasoning_effort: Literal["low", "high", "max"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, strict=True, ge=0, le=20)

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"request: must be a JSON object (got {type(data).__name__})")
        problem = json_problem(data)
        if problem is not None:
            # A custom error type, so the report names the exact path (unknown fields included).
            raise PydanticCustomError("json_unsafe", "{field}: {rule}", {"field": problem[0], "rule": problem[1]})
        if "max_tokens" in data and "max_completion_tokens" in data:
            # What the API does with both is not documented (docs/moonshot-api.md §13): one cap, one name.
            raise ValueError("max_tokens: is the deprecated alias of max_completion_tokens; set only one")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_words(cls, stop: str | list[str] | None) -> str | list[str] | None:
        words = [stop] if isinstance(stop, str) else stop or []
        if len(words) > MAX_STOP_WORDS:
            raise ValueError(f"at most {MAX_STOP_WORDS} stop words (got {len(words)})")
        for word in words:
            if not word:
                raise ValueError("stop words must not be empty")
            if len(word.encode()) > MAX_STOP_BYTES:
                raise ValueError(f"each stop word is at most {MAX_STOP_BYTES} bytes (got {len(word.encode())})")
        return stop

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ChatRequest:
        for i, msg in enumerate(self.messages[:-1]):
            if msg.partial:
                raise ValueError(f"messages.{i}.partial: is only allowed on the last message")
        last = self.messages[-1]
        json_out = self.response_format is not None and self.response_format.type != "text"
        if last.partial and json_out:
            raise ValueError(
                "response_format: Partial Mode cannot be combined with response_format json_object/json_schema"
            )
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.get("name")
            offered = {t.function.name for t in self.tools or []}
            if wanted not in offered:
                raise ValueError(f"tool_choice.function.name: {wanted!r} is not among the offered tools")
        self._check_tool_results()
        problem = model_problem(self.model, self._sampling())
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        return self

    def _sampling(self) -> Sampling:
        choice = self.tool_choice
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            thinking=self.thinking.type if self.thinking is not None else None,
            tool_choice="named" if isinstance(choice, NamedToolChoice) else choice,
        )

    def _check_tool_results(self) -> None:
        known: set[str] = set()
        for i, msg in enumerate(self.messages):
            if msg.tool_calls:
                known.update(call.id for call in msg.tool_calls)
            if msg.role == "tool" and msg.tool_call_id not in known:
                raise ValueError(
                    f"messages.{i}.tool_call_id: {msg.tool_call_id!r} answers no tool call of an earlier assistant"
                    " message"
                )

    def to_payload(self) -> dict[str, Any]:
        """The JSON body to send upstream: what the caller set, unknown fields included.

        Raises:
            InvalidRequest: the body is larger than the API accepts (``MAX_REQUEST_BYTES``).
        """
        payload = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        size = len(to_json(payload))  # compact UTF-8, as json.dumps(ensure_ascii=False) would be, 6x faster
        if size > MAX_REQUEST_BYTES:
            limit = f"must be at most {MAX_REQUEST_BYTES // 2**20} MB as JSON (the API's limit)"
            raise InvalidRequest([("request", f"{limit}; got {size:,} bytes")])
        return payload


_TYPE_NAMES = {"str", "list", "dict", "int", "float", "bool"}


def _field_of(loc: tuple[int | str, ...]) -> str:
    # Pydantic puts union member names (e.g. 'str', 'list[ContentPart]', 'function-after[...]')
    # into locations; users care only about their own field path.
    parts = [p for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper() or p in _TYPE_NAMES))]
    return field_path(parts)


_SUBFIELD_RE = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$", re.DOTALL)


def _describe(err: Any) -> tuple[str, str]:
    if err["type"] == "json_unsafe":
        return str(err["ctx"]["field"]), str(err["ctx"]["rule"])
    field = _field_of(tuple(err["loc"]))
    rule = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return field, "is required"
    if err["type"] == "value_error":
        # Our own validators say "<subfield>: <rule>" when the rule belongs to a nested field.
        match = _SUBFIELD_RE.match(rule)
        if match:
            sub, rule = match.groups()
            field = sub if field == "request" else f"{field}.{sub}"
        return field, rule
    value = err.get("input")
    if isinstance(value, int) and abs(value) > MAX_JSON_INT:
        rule = f"{rule} (got a {value.bit_length()}-bit integer)"  # repr() of a huge int raises
    elif isinstance(value, str | int | float | bool) or value is None:
        shown = repr(value)
        rule = f"{rule} (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return field, rule


def format_validation_error(exc: ValidationError) -> InvalidRequest:
    """Turn pydantic's report into one ``InvalidRequest`` naming each field and rule.

    A value that fails every member of a union is reported by each member; the deepest
    report is the one that says what is wrong, so reports on a parent of another are dropped.
    """
    found: dict[str, str] = {}
    for err in exc.errors():
        field, rule = _describe(err)
        found.setdefault(field, rule)
    keep = [(f, r) for f, r in found.items() if not any(o.startswith(f + ".") for o in found)]
    return InvalidRequest(keep)


# The API's request body limit (docs/moonshot-api.md §2: base64 video included); checked before enqueueing.
MAX_REQUEST_BYTES = 100 * 2**20


def validate_request(request: Any) -> ChatRequest:
    """Validate a request (a dict or a ``ChatRequest``) or raise ``InvalidRequest``."""
    if isinstance(request, ChatRequest):
        return request
    if not isinstance(request, dict):
        raise InvalidRequest([("request", f"must be a JSON object (got {type(request).__name__})")])
    try:
        return ChatRequest.model_validate(request)
    except ValidationError as exc:
        raise format_validation_error(exc) from None
