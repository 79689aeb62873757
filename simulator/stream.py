"""SSE framing and pacing of a response.

Kept apart from what is said (generate/render): a per-request ``Delivery`` paces the frames and
can stall before one of them or cut the connection after some (see ``faults``), without touching
generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from simulator.tokens import count

SSE_CONTENT_TYPE = "text/event-stream"
DONE_FRAME = b"data: [DONE]\n\n"


class ConnectionCut(Exception):
    """Raised by a body iterator to cut the connection abruptly.

    The server closes the socket without ending the body (no last chunk of the chunked encoding,
    or fewer bytes than Content-Length), so the client sees a protocol error, not a clean EOF.
    """


@dataclass(frozen=True)
class Delivery:
    """The per-request plan for putting a response on the wire.

    Attributes:
        first_token_latency_s: pause before the first frame.
        chunk_interval_s: pause between frames.
        stall_before: index of a frame preceded by an extra pause of ``stall_s``; None for none.
        stall_s: length of that extra pause.
        cut_after: frames sent before the connection is cut; None to end normally.
    """

    first_token_latency_s: float = 0.0
    chunk_interval_s: float = 0.0
    stall_before: int | None = None
    stall_s: float = 0.0
    cut_after: int | None = None

    def pause_before(self, index: int) -> float:
        pause = self.first_token_latency_s if index == 0 else self.chunk_interval_s
        return pause + self.stall_s if index == self.stall_before else pause

    def duration_s(self, frames: int) -> float:
        """Wall time a stream of ``frames`` frames takes; a non-stream answer waits as long."""
        stall = self.stall_s if self.stall_before is not None and self.stall_before < frames else 0.0
        return self.first_token_latency_s + self.chunk_interval_s * max(frames - 1, 0) + stall


def encode_frame(chunk: dict[str, Any]) -> bytes:
    data = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_frames(chunks: Iterable[dict[str, Any]]) -> list[bytes]:
    return [*map(encode_frame, chunks), DONE_FRAME]


async def paced(
    frames: list[bytes],
    delivery: Delivery,
    closing: Callable[[], bool],
    on_sent: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yields ``frames`` on the delivery's schedule; stops early once ``closing()`` is true.

    Frames due at the same moment go out as one write: the bytes are identical, and an unpaced
    stream costs one syscall instead of one per chunk (~100 us each through Starlette and h11).
    ``on_sent(n)`` hears of each write's ``n`` frames as it is handed over.

    Raises:
        ConnectionCut: after ``delivery.cut_after`` frames, when set.
    """
    count = on_sent or (lambda n: None)
    due: list[bytes] = []
    end = len(frames) if delivery.cut_after is None else min(delivery.cut_after, len(frames))
    for i, frame in enumerate(frames[:end]):
        pause = delivery.pause_before(i)
        if pause > 0:
            if due:
                count(len(due))
                yield b"".join(due)
                due = []
            await pause_s(pause, closing)
        if closing():
            # Shutting down: end the body cleanly without [DONE], as a dropped upstream stream looks.
            return
        due.append(frame)
    if due:
        count(len(due))
        yield b"".join(due)
    if delivery.cut_after is not None:
        raise ConnectionCut


def frame_tokens(frames: Iterable[bytes]) -> int:
    """Tokens of generated text in SSE frames: content, reasoning and tool-call arguments.

    What a stream that was cut had generated when it stopped (a frame that is not JSON counts 0).
    """
    total = 0
    for frame in frames:
        try:
            chunk = json.loads(frame.removeprefix(b"data: "))
        except ValueError:
            continue
        for choice in chunk.get("choices") or [] if isinstance(chunk, dict) else []:
            delta = choice.get("delta") or {}
            texts = [delta.get("content"), delta.get("reasoning_content")]
            texts += [(call.get("function") or {}).get("arguments") for call in delta.get("tool_calls") or []]
            total += sum(count(text) for text in texts if isinstance(text, str))
    return total


_CONTENT = b'"content":"'


async def stamped(blocks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``blocks`` with each content fragment prefixed by the wall-clock time it is sent, ``[t=<s>]``.

    Stamped as the bytes are handed to the server, so a reader downstream can tell how long the
    fragment took to reach it (``reasoning_content`` is left alone: its key does not match).
    """
    async for block in blocks:
        yield block.replace(_CONTENT, _CONTENT + f"[t={time.time():.6f}]".encode())


# How often a long pause looks at ``closing``: a 30 s stall must not hold a server shutdown.
_WAKE_S = 0.05


async def pause_s(seconds: float, closing: Callable[[], bool]) -> None:
    """Sleeps ``seconds``, or less once ``closing()`` turns true."""
    # asyncio.sleep, not time.sleep: one server holds thousands of concurrent streams.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not closing():
        left = deadline - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, _WAKE_S))


async def trickle(blocks: Iterable[bytes], interval_s: float, closing: Callable[[], bool]) -> AsyncIterator[bytes]:
    """Yields ``blocks`` ``interval_s`` apart; stops early once ``closing()`` is true."""
    for i, block in enumerate(blocks):
        if i:
            await pause_s(interval_s, closing)
        if closing():
            return
        yield block


async def cut_short(body: bytes) -> AsyncIterator[bytes]:
    """Half of a body, then the connection cut: a non-stream reply lost mid-transfer."""
    yield body[: len(body) // 2]
    raise ConnectionCut


class _HideCuts(logging.Filter):
    # uvicorn logs any exception leaving the app at ERROR with a traceback, then closes the socket;
    # the closing is what a cut wants, the traceback is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BaseExceptionGroup):
            return exc.split(ConnectionCut)[1] is not None
        return not isinstance(exc, ConnectionCut)


_FILTER = _HideCuts()


def hide_cut_tracebacks(logger_name: str = "uvicorn.error") -> None:
    """Keeps deliberate cuts out of the server log; idempotent."""
    logging.getLogger(logger_name).addFilter(_FILTER)
