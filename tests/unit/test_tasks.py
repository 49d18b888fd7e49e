"""Stopping background tasks at shutdown (broker/tasks.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker.tasks import cancel


async def test_a_task_that_swallows_a_cancellation_is_still_stopped() -> None:
    """Defect: shutdown cancelled each background task once and waited. A cancellation that
    arrives as an asyncio.timeout expires (redis-py's wait for a pool connection, on Python 3.11)
    becomes a TimeoutError, which the health watcher takes for a busy Redis: it went on with its
    loop, and the lifespan's shutdown waited for it forever (seen as a hung TestClient exit with
    the pool held full). `cancel` now repeats the cancellation until the task is done."""
    unwound: list[str] = []

    async def watcher() -> None:
        try:
            with contextlib.suppress(asyncio.CancelledError):  # the swallowed cancellation
                await asyncio.sleep(60)
            while True:
                await asyncio.sleep(1)  # the loop goes on, like _watch_redis after a StoreBusy
        finally:
            unwound.append("finally")

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel(task))
    done, _ = await asyncio.wait({stopping}, timeout=5)  # (a hang, not a speed: it takes ~0.5 s)
    if not done:  # leave nothing running for the next test
        stopping.cancel()
        task.cancel()
        await asyncio.wait({stopping, task})
    assert stopping in done, "cancel() still waits for a task that swallowed its cancellation"
    assert task.cancelled()
    assert unwound == ["finally"]


async def test_an_error_a_task_ended_with_is_raised_to_the_one_stopping_it() -> None:
    async def broken() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel(task)


async def test_no_task_is_nothing_to_stop() -> None:
    await cancel(None)
