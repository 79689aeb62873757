"""Stopping background tasks whose first cancel is lost (moonq/cancel.py).

On Python 3.11 redis-py's ``asyncio.wait_for`` around each write can swallow a cancel (a task
cancelled during a new connection's handshake returned as if uncancelled in 3 of 8 timings against a
real redis-server, checked by hand); here a loop that loses its first cancel that way.
"""

from __future__ import annotations

import asyncio
import gc

from moonq.cancel import cancel_and_wait


def test_a_loop_that_lost_its_cancel_is_stopped_all_the_same() -> None:
    """A background loop that swallows its first cancel (as above) ends once cancelled again; a task that
    heard its cancel is cancelled once only, so its cleanup runs undisturbed."""

    async def main() -> tuple[int, int, bool]:
        heard = {"deaf": 0, "clean": 0}
        cleaned = False

        async def deaf() -> None:  # loses its first cancel, then loops on as the listener would
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    heard["deaf"] += 1
                    if heard["deaf"] > 1:
                        raise

        async def clean() -> None:  # hears the cancel and takes a while to clean up
            nonlocal cleaned
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                heard["clean"] += 1
                await asyncio.sleep(0.05)
                cleaned = True
                raise

        tasks = [asyncio.create_task(deaf()), asyncio.create_task(clean())]
        await asyncio.sleep(0.02)
        await asyncio.wait_for(cancel_and_wait(tasks, recancel_s=0.1), 5)
        assert all(task.done() for task in tasks)
        return heard["deaf"], heard["clean"], cleaned

    assert asyncio.run(main()) == (2, 1, True)


def test_a_task_that_had_failed_is_not_reported_as_never_retrieved() -> None:
    """Stopping takes the exception of a task that ended with one (as ``await task`` did before): asyncio
    does not log it as never retrieved when the task is dropped."""

    async def main() -> list[str]:
        reported: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context["message"]))

        async def fails() -> None:
            raise ValueError("the reader's last error")

        tasks = [asyncio.create_task(fails())]
        await asyncio.sleep(0)
        await cancel_and_wait(tasks)
        del tasks
        gc.collect()
        return reported

    assert asyncio.run(main()) == []
