"""One job's answer across its attempts: what to send next, what stands, what was billed (pure).

The retry loop (``worker/job.py`` ``_attempts``) does the I/O; this object decides. Per attempt:
``begin`` (the request to send is ``request``), ``published`` for every delta the subscribers got,
then either ``broke`` (the attempt failed and will be retried: resume or start over,
worker/resume.py) or ``answered`` (the attempt's stream ended: the final result, or None when a
builtin tool round follows, worker/rounds.py). Usage over all attempts is worker/billing.py's.
"""

from __future__ import annotations

from typing import Any

from worker.assemble import StreamAssembler
from worker.billing import Bill, bill, settle
from worker.resume import Decision, Streamed, continuation, decide, merge
from worker.rounds import MAX_TOOL_ROUNDS, TOOL_ROUND, next_round


class Answer:
    """The answer to one job's request.

    Args:
        request: the job's request, as the caller wrote it.
        resume_mode: ``MOONQ_RESUME``: ``partial`` continues a broken stream, ``restart`` starts over.
        builtin_tools: the job's ``builtin_tools`` option (``auto``: the worker runs the tool rounds).
    """

    def __init__(self, request: dict[str, Any], *, resume_mode: str, builtin_tools: str | None = None) -> None:
        self.mode = resume_mode
        self.builtin_tools = builtin_tools
        self.base = request  # the current round's request, before any continuation
        self.request = request  # what the next attempt sends
        self.streamed = Streamed()
        self.bills: list[Bill] = []
        self.rounds = 0
        self._prefix = ("", "")  # content and reasoning that stood when the current attempt began
        self._resumed = False  # the current attempt continues the one before

    def begin(self) -> None:
        """A new attempt starts; it sends ``request``."""
        self.streamed.new_attempt()

    def published(self, index: int, delta: dict[str, Any]) -> None:
        self.streamed.add(index, delta)

    def broke(self, attempt: int, reason: str, assembler: StreamAssembler) -> Decision:
        """The attempt failed and another follows: continue the answer, or start it over."""
        self._bill(attempt, reason, assembler, final=False)
        finished = any(r is not None for r in assembler.finish_reasons().values())
        decision = decide(self.base, self.streamed, finished=finished, mode=self.mode)
        if decision.resume:
            self.request = continuation(self.base, self.streamed)
            self._prefix = (self.streamed.text(), self.streamed.reasoning_text())
            self._resumed = True
        else:
            self._start_over(self.base)
        return decision

    def answered(self, attempt: int, completion: dict[str, Any], assembler: StreamAssembler) -> dict[str, Any] | None:
        """The attempt's stream ended: the job's result, or None when a builtin tool round follows."""
        completion = merge(completion, *self._prefix)
        following = None
        if self.builtin_tools == "auto" and self.rounds < MAX_TOOL_ROUNDS:
            following = next_round(self.base, completion)
        self._bill(attempt, TOOL_ROUND if following is not None else "completed", assembler, final=True)
        if following is not None:
            self.rounds += 1
            self._start_over(following)
            return None
        return settle(completion, self.bills)

    def _start_over(self, request: dict[str, Any]) -> None:
        self.base = self.request = request
        self.streamed = Streamed()
        self._prefix = ("", "")
        self._resumed = False

    def _bill(self, attempt: int, outcome: str, assembler: StreamAssembler, *, final: bool) -> None:
        """Record what the attempt cost; an attempt that never reached a stream cost nothing."""
        if assembler.chunks == 0 and not final:
            return
        reported = assembler.usage()
        self.bills.append(
            bill(
                attempt,
                outcome,
                resumed=self._resumed,
                reported=reported,
                request=self.request,
                generated=self.streamed.attempt_text,
            )
        )
