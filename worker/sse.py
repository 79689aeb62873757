"""A pure, incremental Server-Sent Events decoder.

Bytes go in as the network hands them over, split anywhere (inside a UTF-8 sequence,
between ``\\r`` and ``\\n``); complete events come out. It does no I/O, so it is tested by
feeding one stream at every split point. Follows the WHATWG event-stream rules that
matter for chat streams: ``\\n``, ``\\r\\n`` and ``\\r`` end lines, ``:`` lines are comments,
multiple ``data:`` lines join with ``\\n``, one leading space after the colon is dropped,
and an event is dispatched at a blank line only if it has data.

Linear in the bytes fed, however they are split: one asyncio loop serves every job of a node,
so a hostile upstream must not be able to stall it with a chunk of many short lines or a line
that arrives in many small pieces. An event (or a line) longer than ``MAX_EVENT_BYTES`` ends the
stream with ``StreamInterrupted`` rather than growing without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.errors import StreamInterrupted

# Far above any real chunk (a delta is a few hundred bytes; a whole long answer in one chunk is
# well under 1 MiB), low enough that a runaway stream cannot take a node's memory.
MAX_EVENT_BYTES = 16 * 1024 * 1024
_LINE_END = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    """Feed bytes with ``feed``; call ``flush`` at end of stream for a trailing event."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip_lf = False  # the previous chunk ended in \r: a leading \n belongs to it
        self._data: list[str] = []
        self._data_size = 0  # characters of data so far in this event (bytes, near enough)
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        whole = self._whole_events(chunk)
        if whole is not None:
            return whole
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        # The unterminated tail held no line end: scan only the new bytes (no rescans, no reslicing).
        pos = start = 0
        scan_from = len(self._buf)
        self._buf += chunk
        buf = self._buf
        out: list[SSEEvent] = []
        while (match := _LINE_END.search(buf, max(pos, scan_from))) is not None:
            end = match.start()
            if buf[end : end + 1] == b"\r" and end + 1 == len(buf):
                self._skip_lf = True  # a \r at the very end: a \n may follow in the next chunk
                pos = end + 1
            else:
                pos = end + (2 if buf[end : end + 2] == b"\r\n" else 1)
            event = self._line(bytes(buf[start:end]).decode("utf-8", errors="replace"))
            start = pos
            if event is not None:
                out.append(event)
        del buf[:start]
        if len(buf) > MAX_EVENT_BYTES:
            raise StreamInterrupted(f"an SSE line is longer than {MAX_EVENT_BYTES} bytes", type="invalid_stream")
        return out

    def _whole_events(self, chunk: bytes) -> list[SSEEvent] | None:
        """The events of ``chunk`` when it is nothing but whole ``data: <one line>`` events ending in a blank
        line, with nothing pending from earlier chunks (the usual read of a chat stream: one chunk, one
        event); else None, and the general path decodes it. The same events the general path gives."""
        if self._buf or self._skip_lf or self._data or self._event is not None:
            return None
        if not chunk.endswith(b"\n\n") or b"\r" in chunk or len(chunk) > MAX_EVENT_BYTES:
            return None
        out = []
        for piece in chunk[:-2].split(b"\n\n"):
            if not piece.startswith(b"data: ") or b"\n" in piece:
                return None
            out.append(SSEEvent(data=piece[6:].decode("utf-8", errors="replace"), id=self._id))
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_size += len(value)
            if self._data_size > MAX_EVENT_BYTES:
                raise StreamInterrupted(f"an SSE event is longer than {MAX_EVENT_BYTES} bytes", type="invalid_stream")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = None
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event, id=self._id)
        self._data, self._data_size, self._event = [], 0, None
        return event

    def flush(self) -> list[SSEEvent]:
        """End of stream: a last line without terminator, and an event without a blank line."""
        out: list[SSEEvent] = []
        if self._buf:
            line, self._buf = bytes(self._buf), bytearray()
            self._line(line.decode("utf-8", errors="replace"))
        event = self._dispatch()
        if event is not None:
            out.append(event)
        return out
