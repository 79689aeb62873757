"""A pure, incremental Server-Sent Events decoder.

Bytes go in as the network hands them over, split anywhere (inside a UTF-8 sequence,
between ``\\r`` and ``\\n``); complete events come out. It does no I/O, so it is tested by
feeding one stream at every split point. Follows the WHATWG event-stream rules that
matter for chat streams: ``\\n``, ``\\r\\n`` and ``\\r`` end lines, ``:`` lines are comments,
multiple ``data:`` lines join with ``\\n``, one leading space after the colon is dropped,
and an event is dispatched at a blank line only if it has data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    """Feed bytes with ``feed``; call ``flush`` at end of stream for a trailing event."""

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the previous chunk ended in \r: a leading \n belongs to it
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            cut = self._line_end()
            if cut is None:
                return out
            end, sep_len = cut
            line = self._buf[:end]
            self._buf = self._buf[end + sep_len :]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                out.append(event)

    def _line_end(self) -> tuple[int, int] | None:
        lf = self._buf.find(b"\n")
        cr = self._buf.find(b"\r")
        if cr == -1 and lf == -1:
            return None
        if cr == -1 or (lf != -1 and lf < cr):
            return lf, 1
        if cr + 1 < len(self._buf):
            return cr, 2 if self._buf[cr + 1 : cr + 2] == b"\n" else 1
        # A \r at the very end: the line is complete, but a \n may follow in the next chunk.
        self._skip_lf = True
        return cr, 1

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
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
        self._data, self._event = [], None
        return event

    def flush(self) -> list[SSEEvent]:
        """End of stream: a last line without terminator, and an event without a blank line."""
        out: list[SSEEvent] = []
        if self._buf:
            line, self._buf = self._buf, b""
            self._line(line.decode("utf-8", errors="replace"))
        event = self._dispatch()
        if event is not None:
            out.append(event)
        return out
