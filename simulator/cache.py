"""Automatic context caching: remembers message prefixes and reports how much of a prompt was seen.

A hit is the longest previously seen prefix of whole messages, excluding the last message (the
new turn is never cached), with the tools block counted as part of every prefix. Entries are
keyed by model and ``prompt_cache_key`` so sessions that pass a key share hits only with
themselves. The cache is a bounded LRU; the real TTL is undocumented.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from simulator.tokens import compact_json, prefix_tokens


class PrefixCache:
    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def cached_tokens(self, namespace: str, messages: Sequence[dict[str, Any]], tools: Sequence[Any]) -> int:
        """Tokens of the longest remembered prefix; then remembers every prefix of this prompt."""
        hashes = _prefix_hashes(namespace, messages, tools)
        sizes = prefix_tokens(messages, tools)
        hit = 0
        for i in range(len(messages) - 2, -1, -1):
            if hashes[i] in self._seen:
                self._seen.move_to_end(hashes[i])
                hit = sizes[i]
                break
        self._remember(hashes)
        return hit

    def _remember(self, hashes: list[bytes]) -> None:
        for digest in hashes:
            self._seen[digest] = None
            self._seen.move_to_end(digest)
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)


def _prefix_hashes(namespace: str, messages: Sequence[dict[str, Any]], tools: Sequence[Any]) -> list[bytes]:
    # A hash chain: entry i commits to the namespace, the tools and messages[:i+1].
    digest = hashlib.sha256(compact_json([namespace, list(tools)]).encode()).digest()
    out = []
    for message in messages:
        digest = hashlib.sha256(digest + compact_json(message).encode()).digest()
        out.append(digest)
    return out
