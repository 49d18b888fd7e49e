"""Background task helpers shared by the modules that own long-running tasks."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel"]


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has finished unwinding (its `finally` blocks have run)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
