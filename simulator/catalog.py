"""The model catalogue: what each model id accepts and how it reports usage.

Numbers come from docs/moonshot-api.md §2/§3/§9; where the docs are silent (context of the K2 previews,
default output budget of older models) the values follow the public model pages of the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Thinking(Enum):
    NEVER = "never"  # no reasoning; a ``thinking`` field is ignored
    ALWAYS = "always"  # kimi-k2-thinking*: reasons whatever the request says
    DEFAULT_ON = "default_on"  # k2.5/k2.6: on unless ``thinking: {"type": "disabled"}``
    ENABLED_ONLY = "enabled_only"  # k2.7-code: ``disabled`` is a 400
    EFFORT = "effort"  # k3: always on, depth set by top-level ``reasoning_effort``


class CacheStyle(Enum):
    NONE = "none"  # moonshot-v1: no automatic cache, no cached_tokens field
    TOP = "top"  # top-level ``usage.cached_tokens`` (2026 API reference)
    NESTED = "nested"  # k2.5: ``usage.prompt_tokens_details.cached_tokens`` only
    BOTH = "both"  # k2.6/k2.7/k3: both spellings


@dataclass(frozen=True)
class ModelSpec:
    id: str
    context_length: int
    default_max_completion_tokens: int
    thinking: Thinking = Thinking.NEVER
    vision: bool = False
    # k2.5/k2.6 pin temperature/top_p/n/penalties and reject any other value.
    fixed_sampling: bool = False
    cache: CacheStyle = CacheStyle.TOP
    created: int = 1_767_225_600


_K = 1024
_SPECS = (
    ModelSpec("kimi-k3", 1024 * _K, 131_072, Thinking.EFFORT, vision=True, cache=CacheStyle.BOTH),
    ModelSpec("kimi-k2.7-code", 256 * _K, 32_768, Thinking.ENABLED_ONLY, vision=True, cache=CacheStyle.BOTH),
    ModelSpec("kimi-k2.7-code-highspeed", 256 * _K, 32_768, Thinking.ENABLED_ONLY, vision=True, cache=CacheStyle.BOTH),
    ModelSpec("kimi-k2.6", 256 * _K, 32_768, Thinking.DEFAULT_ON, True, True, CacheStyle.BOTH),
    ModelSpec("kimi-k2.5", 256 * _K, 32_768, Thinking.DEFAULT_ON, True, True, CacheStyle.NESTED),
    ModelSpec("kimi-k2-0905-preview", 256 * _K, 1024),
    ModelSpec("kimi-k2-0711-preview", 128 * _K, 1024),
    ModelSpec("kimi-k2-turbo-preview", 256 * _K, 1024),
    # Thinking models spend the budget on reasoning first; docs advise >= 16k, so default high.
    ModelSpec("kimi-k2-thinking", 256 * _K, 32_768, Thinking.ALWAYS),
    ModelSpec("kimi-k2-thinking-turbo", 256 * _K, 32_768, Thinking.ALWAYS),
    ModelSpec("moonshot-v1-8k", 8 * _K, 1024, cache=CacheStyle.NONE),
    ModelSpec("moonshot-v1-32k", 32 * _K, 1024, cache=CacheStyle.NONE),
    ModelSpec("moonshot-v1-128k", 128 * _K, 1024, cache=CacheStyle.NONE),
    # moonshot-v1-auto picks 8k/32k/128k by prompt size, so its ceiling is the 128k one.
    ModelSpec("moonshot-v1-auto", 128 * _K, 1024, cache=CacheStyle.NONE),
    ModelSpec("moonshot-v1-8k-vision-preview", 8 * _K, 1024, vision=True, cache=CacheStyle.NONE),
    ModelSpec("moonshot-v1-32k-vision-preview", 32 * _K, 1024, vision=True, cache=CacheStyle.NONE),
    ModelSpec("moonshot-v1-128k-vision-preview", 128 * _K, 1024, vision=True, cache=CacheStyle.NONE),
    ModelSpec("kimi-latest", 128 * _K, 1024, vision=True),
)

CATALOG: dict[str, ModelSpec] = {spec.id: spec for spec in _SPECS}


def lookup(model: str) -> ModelSpec | None:
    return CATALOG.get(model)
