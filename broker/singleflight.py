"""Collapsing concurrent fetches: per key, one in this process (a shared task) and one across
the fleet (a Redis lock with a double-checked read), spec §4.4.

    miss ─▶ join the local task for the key, or start it
              └─▶ lock (NX PX, + fence) ── won ──▶ re-read L2 ── still missing ──▶ fetch, fenced write, release
                                 └─ lost ─▶ wait for the "set" event (bounded poll as fallback);
                                            lock gone and still nothing ─▶ try the lock again
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from broker.entries import CachedToken
from broker.errors import StoreBusy, StoreUnavailable, UpstreamUnavailable
from broker.events import Event
from broker.store import Lock, Store, TokenKeys
from broker.tasks import cancel

__all__ = ["DistributedFlight", "LocalFlight"]

log = structlog.get_logger("broker.singleflight")

T = TypeVar("T")

_POLL_FIRST = 0.05
_POLL_MAX = 0.5


class LocalFlight(Generic[T]):
    """One asyncio task per key; everyone who asks meanwhile awaits the same task."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[T]] = {}

    def running(self, key: str) -> bool:
        return key in self._tasks

    async def join(self, key: str) -> T | None:
        """The result of the work running for `key`, or None at once if none is running."""
        task = self._tasks.get(key)
        return None if task is None else await asyncio.shield(task)

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Returns (result, led) where `led` is true for the caller that started the work."""
        task = self._tasks.get(key)
        led = task is None
        if task is None:
            task = self._spawn(key, factory)
        # shield: a caller that goes away must not cancel the fetch others are waiting for
        return await asyncio.shield(task), led

    def start(self, key: str, factory: Callable[[], Awaitable[T]]) -> asyncio.Task[T] | None:
        """Start background work for `key` unless some is already running."""
        return None if key in self._tasks else self._spawn(key, factory)

    def _spawn(self, key: str, factory: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(factory())
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._done(key, t))
        return task

    def _done(self, key: str, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported as lost

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class DistributedFlight:
    """The cross-process half: a Redis lock per key, waiting on events for the winner's value.

    The lock comes with a fence (a number above every earlier one for the key) that the holder's
    write carries: a holder that lost its lock (stalled past its TTL) can still write, but never
    over a token written under a later lock, nor after a drop of one (spec §4.4).
    """

    def __init__(self, store: Store, lock_ttl: float) -> None:
        self.store = store
        self.lock_ttl = lock_ttl
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, event: Event) -> None:
        """Called for every event on the channel: wakes whoever waits for that key."""
        if event.op == "set":
            for waiter in self._waiters.get(event.key, ()):
                waiter.set()

    async def run(
        self,
        keys: TokenKeys,
        accept: Callable[[CachedToken], bool],
        fetch: Callable[[Lock], Awaitable[CachedToken]],
        deadline: float,
    ) -> tuple[CachedToken, bool]:
        """A token that `accept` likes: someone's, or one `fetch(lock)` gets. (token, fetched_here)."""
        owner = secrets.token_hex(16)
        while True:
            lock = await self.store.acquire_lock(keys, owner, self.lock_ttl)
            if lock is not None:
                renewer = asyncio.create_task(self._renew(lock))
                try:
                    current = await self.store.get(keys)  # double-check under the lock
                    if current is not None and accept(current):
                        return current, False
                    return await fetch(lock), True
                finally:
                    await cancel(renewer)
                    with contextlib.suppress(StoreUnavailable, StoreBusy):
                        await self.store.release_lock(lock)
            found = await self._wait(keys, accept, deadline)
            if found is not None:
                return found, False

    async def _renew(self, lock: Lock) -> None:
        """Keep the lock while the fetch runs; a dead holder stops renewing and the lock expires.

        A failed renewal is tried again next time (a Redis blip must not cost the lock for good);
        a lock found taken over is given up: the fence keeps this holder's write from doing harm.
        """
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                if not await self.store.renew_lock(lock, self.lock_ttl):
                    log.warning("singleflight.lock_lost", lock=lock.key)
                    return
            except (StoreUnavailable, StoreBusy):
                continue

    async def _wait(
        self, keys: TokenKeys, accept: Callable[[CachedToken], bool], deadline: float
    ) -> CachedToken | None:
        """Wait for another process's fetch. None when its lock is gone and nothing usable came."""
        waiter = asyncio.Event()
        self._waiters.setdefault(keys.token, set()).add(waiter)
        poll = _POLL_FIRST
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamUnavailable("Timed out waiting for another broker process to fetch this token.")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(poll, remaining)):
                        await waiter.wait()
                waiter.clear()
                current = await self.store.get(keys)
                if current is not None and accept(current):
                    return current
                if not await self.store.lock_held(keys):
                    return None
                poll = min(poll * 2, _POLL_MAX)
        finally:
            waiters = self._waiters.get(keys.token)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[keys.token]
