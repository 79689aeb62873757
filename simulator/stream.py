"""SSE framing and pacing of a response.

Kept apart from what is said (generate/render) so a per-request ``Delivery`` can later inject
faults — drop the connection after chunk k, omit ``[DONE]``, corrupt a frame, stall — by
transforming the frame list or the pacing, without touching generation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

SSE_CONTENT_TYPE = "text/event-stream"
DONE_FRAME = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Delivery:
    """The per-request plan for putting a response on the wire.

    Today it only paces; fault injection extends it (e.g. ``drop_after_frames``, ``omit_done``,
    ``corrupt_frame``, ``stall_s``) and applies those to the frame list in ``paced``.
    """

    first_token_latency_s: float = 0.0
    chunk_interval_s: float = 0.0

    def duration_s(self, frames: int) -> float:
        """Wall time a stream of ``frames`` frames takes; a non-stream answer waits as long."""
        return self.first_token_latency_s + self.chunk_interval_s * max(frames - 1, 0)


def encode_frame(chunk: dict[str, Any]) -> bytes:
    data = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_frames(chunks: Iterable[dict[str, Any]]) -> list[bytes]:
    return [*map(encode_frame, chunks), DONE_FRAME]


async def paced(frames: list[bytes], delivery: Delivery, closing: Callable[[], bool]) -> AsyncIterator[bytes]:
    """Yields ``frames`` on the delivery's schedule; stops early once ``closing()`` is true.

    Frames due at the same moment go out as one write: the bytes are identical, and an unpaced
    stream costs one syscall instead of one per chunk (~100 us each through Starlette and h11).
    """
    due: list[bytes] = []
    for i, frame in enumerate(frames):
        # asyncio.sleep, not time.sleep: one server holds thousands of concurrent streams.
        pause = delivery.first_token_latency_s if i == 0 else delivery.chunk_interval_s
        if pause > 0:
            if due:
                yield b"".join(due)
                due = []
            await asyncio.sleep(pause)
        if closing():
            # Shutting down: end the body cleanly without [DONE], as a dropped upstream stream looks.
            return
        due.append(frame)
    if due:
        yield b"".join(due)
