"""Background task helpers shared by the modules that own long-running tasks."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel"]

_RECANCEL_SECONDS = 0.5


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has finished unwinding (its `finally` blocks have run).

    The cancellation is repeated until the task is done: one can be swallowed below us. On
    Python 3.11 an `asyncio.timeout` that expires as the cancellation arrives turns it into a
    TimeoutError (redis-py's pool wait is one: "No connection available."), which a background
    loop takes for a busy Redis and goes on, and shutdown would wait for it forever."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task
