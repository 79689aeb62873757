"""Stopping tasks whose cancel can be lost on Python 3.11.

``asyncio.wait_for`` in Python 3.11 swallows a cancel that arrives as the awaited work completes
(python/cpython#86296), and redis-py wraps every write in it (``send_packed_command``). A task
cancelled while one of its Redis commands is being sent can so carry on as if nothing happened: a
background loop (the cancel listener, the heartbeat, the sweeper) then runs for ever, and a node's
close waited on it until its 15 s bound ran out (seen in CI: ``Runtime.stop`` timing out after a
test that had passed). A task cancelled again while it is still running after a short grace is
stopped, as anyio's cancel scopes do by delivering a cancel until the task leaves them.

Every part stops its Redis-talking tasks this way: a node's background tasks and its limiter's, the
SDK's pub/sub reader (``Fanout.close``) and the gateway's wait for a job whose caller hung up. A node's
running jobs are told of a shutdown by a flag as well as their cancel (worker/job.py ``_still_ours``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# A task that heard its cancel ends well within this (its cleanup is a few Redis calls); one still
# running after it most likely lost the cancel, and is cancelled again.
RECANCEL_S = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], recancel_s: float = RECANCEL_S) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again those still running every
    ``recancel_s``. Their exceptions are taken and dropped (as ``gather(return_exceptions=True)``), so none
    is reported as never retrieved."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()
