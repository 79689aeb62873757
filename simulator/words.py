"""Deterministic English-ish prose: every word is one token, so lengths are exact in tokens."""

from __future__ import annotations

import random

VOCABULARY = (
    "the a of and to in is that it for on with as was at by this from are be or an which one all "
    "model answer queue worker token stream request result river mountain signal garden window lantern "
    "harbor meadow orbit pattern engine letter market bridge forest silver copper morning evening "
    "quiet bright steady gentle rapid careful simple clear early later often always never perhaps "
    "builds carries follows shows keeps moves finds brings holds turns opens reaches writes reads "
    "north south east west summer winter autumn spring cloud stone paper garden island valley canyon "
    "number measure balance season journey moment question reason method detail example context"
).split()


def phrase(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


def sentence(rng: random.Random, tokens: int) -> str:
    """A capitalised sentence of exactly ``tokens`` tokens (>= 2), full stop included."""
    words = [rng.choice(VOCABULARY) for _ in range(tokens - 1)]
    words[0] = words[0].capitalize()
    text = " ".join(words)
    if tokens >= 7:  # a comma replaces one word so long sentences read naturally
        head, tail = " ".join(words[:3]), " ".join(words[4:])
        text = f"{head}, {tail}"
    return text + "."


def prose(rng: random.Random, tokens: int) -> str:
    """Sentences totalling ``tokens`` tokens (one less when a lone token would be left over)."""
    parts = []
    remaining = max(tokens, 2)
    while remaining >= 2:
        size = min(rng.randint(5, 13), remaining)
        if remaining - size == 1:
            size -= 1  # never leave a single token: a sentence needs a word and a full stop
        parts.append(sentence(rng, max(size, 2)))
        remaining -= max(size, 2)
    return " ".join(parts)
