"""Printing a job's events as readable text on a terminal, as they arrive."""

from __future__ import annotations

from typing import Any, TextIO

from rich.console import COLOR_SYSTEMS, Console
from rich.style import Style

from moonq.wire import Event

DIM, BOLD, RED = Style(dim=True), Style(bold=True), Style(color="red")


class Renderer:
    """Writes deltas of choice 0 as text: reasoning dimmed, tool calls as ``→ name(args)``.

    The model's text is written exactly as it arrives (no wrapping, tabs kept); only styles come
    from rich, and only when ``out`` is a terminal (``color`` forces either way).
    """

    def __init__(self, out: TextIO, *, color: bool | None = None) -> None:
        self.out = out
        # rich decides whether, and with which codes, the terminal shows styles (NO_COLOR included).
        console = Console(file=out, force_terminal=color)
        system = console.color_system  # None unless out is a terminal that shows styles
        self._colors = COLOR_SYSTEMS[system] if system else None
        self._no_color = console.no_color
        self._mode = ""  # what was printed last: "reasoning", "content", "tool"

    def _style(self, style: Style, text: str) -> str:
        if self._no_color:
            style = style.without_color
        return style.render(text, color_system=self._colors)

    def _switch(self, mode: str, prefix: str = "") -> None:
        if self._mode and self._mode != mode:
            self.out.write("\n")
        if self._mode != mode and prefix:
            self.out.write(prefix)
        self._mode = mode

    def event(self, event: Event) -> None:
        if event.type == "delta" and event.index == 0 and event.delta:
            self._delta(event.delta)
        elif event.type == "retry" and event.resume:
            pass  # resumed: the text so far stands and the next attempt continues it on the same line
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
