"""One request's answer: drafts concluded per choice, cache lookup and usage, ready to render."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from simulator.cache import PrefixCache
from simulator.catalog import CacheStyle
from simulator.config import SimConfig
from simulator.finish import Outcome, conclude
from simulator.generate import draft
from simulator.render import Json, Meta, completion_body, stream_chunks, usage
from simulator.tokens import compact_json
from simulator.validate import ChatRequest


@dataclass(frozen=True)
class Answer:
    request: ChatRequest
    meta: Meta
    outcomes: list[Outcome]
    cached_tokens: int

    def usage(self, choice: int | None = None) -> Json:
        """Usage of one choice (stream final chunks) or of all choices together."""
        picked = self.outcomes if choice is None else [self.outcomes[choice]]
        completion = sum(o.completion_tokens for o in picked)
        return usage(self.request.prompt_tokens, completion, self.cached_tokens, self.request.spec.cache)

    def body(self) -> Json:
        return completion_body(self.meta, self.outcomes, self.usage(), self.request.thinking)

    def chunks(self, next_size: Callable[[], int]) -> list[Json]:
        usages = [self.usage(i) for i in range(len(self.outcomes))]
        total = self.usage() if self.request.include_usage else None
        return stream_chunks(self.meta, self.outcomes, usages, total, next_size)


def answer(cfg: SimConfig, cache: PrefixCache, req: ChatRequest) -> Answer:
    cached = 0
    if req.spec.cache is not CacheStyle.NONE:
        namespace = f"{req.model}\x00{req.prompt_cache_key or ''}"
        cached = cache.cached_tokens(namespace, req.messages, req.tools)
    outcomes = [conclude(draft(cfg, req, i), req.max_completion_tokens, req.stop) for i in range(req.n)]
    return Answer(req, Meta(req.model), outcomes, cached)


def chunk_sizes(cfg: SimConfig, req: ChatRequest) -> Callable[[], int]:
    """Tokens per stream fragment: fixed when configured, else 1-3 like the real API.

    Seeded from the request so a replayed request streams byte-identical fragments.
    """
    if cfg.tokens_per_chunk is not None:
        fixed = cfg.tokens_per_chunk
        return lambda: fixed
    material = compact_json([cfg.seed, req.model, req.messages]).encode()
    rng = random.Random(hashlib.sha256(material).digest())
    return lambda: rng.randint(1, 3)
