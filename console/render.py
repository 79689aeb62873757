"""Printing a job's events as readable text on a terminal, as they arrive."""

from __future__ import annotations

from typing import Any, TextIO

from moonq.wire import Event

DIM, BOLD, RED, RESET = "\x1b[2m", "\x1b[1m", "\x1b[31m", "\x1b[0m"


class Renderer:
    """Writes deltas of choice 0 as text: reasoning dimmed, tool calls as ``→ name(args)``."""

    def __init__(self, out: TextIO, *, color: bool | None = None) -> None:
        self.out = out
        self.color = out.isatty() if color is None else color
        self._mode = ""  # what was printed last: "reasoning", "content", "tool"

    def _style(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color and text else text

    def _switch(self, mode: str, prefix: str = "") -> None:
        if self._mode and self._mode != mode:
            self.out.write("\n")
        if self._mode != mode and prefix:
            self.out.write(prefix)
        self._mode = mode

    def event(self, event: Event) -> None:
        if event.type == "delta" and event.index == 0 and event.delta:
            self._delta(event.delta)
        elif event.type == "retry":
            self._switch("note")
            self.out.write(
                self._style(DIM, f"[retrying: attempt {event.attempt} in {event.delay_s:.1f}s: {event.reason}]")
            )
        elif event.type == "failed" and event.error is not None:
            self._switch("note")
            self.out.write(self._style(RED, f"[failed: {event.error.type}: {event.error.message}]"))
        elif event.type == "cancelled":
            self._switch("note")
            self.out.write(self._style(RED, "[cancelled]"))
        if event.terminal and self._mode:
            self.out.write("\n")
            self._mode = ""
        self.out.flush()

    def _delta(self, delta: dict[str, Any]) -> None:
        if delta.get("reasoning_content"):
            self._switch("reasoning", self._style(DIM, "thinking: "))
            self.out.write(self._style(DIM, delta["reasoning_content"]))
        if delta.get("content"):
            self._switch("content")
            self.out.write(delta["content"])
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            if fn.get("name"):
                self._switch("tool")
                self.out.write(
                    ("\n" if self._mode == "tool" and call.get("index", 0) else "")
                    + self._style(BOLD, f"→ {fn['name']}")
                )
            if fn.get("arguments"):
                self.out.write(fn["arguments"])
