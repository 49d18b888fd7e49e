"""Per-caller rate limits, shared by every worker of every replica (spec §6.6).

    fast path ─▶ try_spend ─▶ a unit of this worker's allowance of the caller (sync, no I/O)
                     │ none left: not decided there, the route decides
    route ─────▶ spend ──▶ try_spend ─▶ take a batch from Redis (one GCRA script, Redis's clock)
                                          │ nothing granted: 429, remembered until a unit is free
                                          │ Redis down or busy: this worker's own GCRA decides

Redis holds one GCRA per caller (broker/store.py `take_rate`). A worker takes units in batches
and spends them without I/O, so L1 hits count without a Redis round trip each. A batch is at
most 50 ms of the caller's rate (at least 1: below 40/s every request takes its own unit), sized
by what the worker spent of its last one, and what is not spent within 100 ms lapses. When three
quarters of a batch (or of its time) are gone, the next one is taken in the background, so a
busy caller's requests never wait for Redis (they did, all at once, every 100 ms: a p99 of
25-35 ms against 4 ms unlimited). Every unit spent was granted by Redis at most 100 ms before,
so over any period the fleet admits at most what the limit allows plus the units workers held
when it began: at most min(workers * (2 * batch - 1), rate * 0.1 s) requests, none below 40/s
(README, Rate limits).

When Redis cannot answer (StoreUnavailable, or StoreBusy: a local decision, never a 503),
each worker enforces the caller's rate and burst on its own, for a second after the failure and
for as long as the store knows Redis is unreachable: the fleet fails open, up to workers times
the limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from broker.clock import Clock, SystemClock
from broker.errors import RateLimited, StoreBusy, StoreUnavailable
from broker.metrics import Stats
from broker.store import Store
from broker.vault.models import CallerSettings, RateLimit

__all__ = ["ALLOWANCE_SECONDS", "BATCH_SECONDS", "LOCAL_SECONDS", "RateLimiter"]

log = structlog.get_logger("broker.ratelimit")

BATCH_SECONDS = 0.05  # a batch is at most this much of the caller's rate
ALLOWANCE_SECONDS = 0.1  # units of a batch not spent by then lapse: no worker hoards them
RECHECK_SECONDS = 1.0  # a refusal is trusted at most this long (a limit raised meanwhile shows)
LOCAL_SECONDS = 1.0  # after Redis failed to answer, this worker decides alone this long
_MAX_CALLERS = 10_000  # budgets remembered; callers deleted meanwhile leave theirs behind


@dataclass(slots=True)
class _Budget:
    """What this worker holds of one caller's limit."""

    units: int = 0  # left of the last batch
    lapses: float = 0.0  # when they lapse (monotonic)
    granted: int = 0  # size of the last batch
    free_at: float = 0.0  # Redis said: no unit before this
    recheck: float = 0.0  # ... and is not asked again before this
    local_tat: float = 0.0  # this worker's own GCRA, while Redis cannot answer
    waiting: int = 0  # requests of the caller in `spend` now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_units: int = 0  # the batch taken ahead, spent once the one in hand is gone
    next_lapses: float = 0.0
    ahead: asyncio.Task[None] | None = None  # taking the next batch now


class RateLimiter:
    def __init__(self, store: Store, stats: Stats, clock: Clock | None = None) -> None:
        self.store = store
        self.stats = stats
        self.clock = clock or SystemClock()
        self._budgets: dict[str, _Budget] = {}
        self._local_until = 0.0
        self._local = False  # logged that this worker decides alone
        self._ahead: set[asyncio.Task[None]] = set()  # batches being taken ahead

    def try_spend(self, caller: CallerSettings) -> bool:
        """A unit of the caller's limit from what this worker holds, without I/O. True: go on;
        False: not decided here (the route's `spend` decides)."""
        limit = caller.rate_limit
        if limit is None:
            return True
        budget = self._budgets.get(caller.name)
        if budget is None:
            return False
        now = self.clock.monotonic()
        if budget.units <= 0 or now >= budget.lapses:
            if budget.next_units <= 0 or now >= budget.next_lapses:
                return self._is_local(now) and _local_wait(budget, limit, now) == 0.0
            # the batch taken ahead becomes the one in hand
            budget.granted = budget.units = budget.next_units
            budget.lapses = budget.next_lapses
            budget.next_units = 0
        budget.units -= 1
        if budget.granted > 1 and budget.ahead is None and budget.next_units <= 0:  # below 40/s: exact, none ahead
            if budget.units * 4 <= budget.granted:  # three quarters spent: it will all go, twice as many
                self._take_ahead(caller.name, limit, budget, 2 * budget.granted)
            elif now + ALLOWANCE_SECONDS / 4 >= budget.lapses:  # most of its time gone: twice what went
                self._take_ahead(caller.name, limit, budget, 2 * (budget.granted - budget.units))
        return True

    async def spend(self, caller: CallerSettings) -> None:
        """A unit of the caller's limit, or RateLimited with the time until one is free."""
        limit = caller.rate_limit
        if limit is None or self.try_spend(caller):
            return
        budget = self._budget(caller.name)
        budget.waiting += 1
        try:
            async with budget.lock:  # one batch in flight per caller and worker
                if budget.ahead is not None:  # the next batch is on its way: wait for it
                    await asyncio.shield(budget.ahead)
                if not self.try_spend(caller):  # a batch taken meanwhile serves this one too
                    await self._take(caller.name, limit, budget)
        finally:
            budget.waiting -= 1

    async def _take(self, name: str, limit: RateLimit, budget: _Budget) -> None:
        now = self.clock.monotonic()
        if self._is_local(now):
            self._note_local("Redis is unreachable.")
            self._decide_locally(name, limit, budget, now)
            return
        if now < budget.recheck:
            raise self._limited(name, limit, budget.free_at - now)
        # All of the last batch spent: ask for twice as much; part of it: twice what was spent.
        want = min(_batch_cap(limit), max(1, 2 * (budget.granted - budget.units), budget.waiting))
        budget.units = budget.granted = 0
        answer = await self._ask(name, limit, budget, want)
        now = self.clock.monotonic()
        if answer is None:
            self._decide_locally(name, limit, budget, now)
            return
        granted, wait = answer
        if granted == 0:
            raise self._limited(name, limit, wait)
        budget.granted = granted
        budget.units = granted - 1  # one for this request
        budget.lapses = now + ALLOWANCE_SECONDS

    def _take_ahead(self, name: str, limit: RateLimit, budget: _Budget, want: int) -> None:
        """Take the next batch in the background once three quarters of the one in hand (or of
        its time) are gone, so that no request of a busy caller waits for Redis."""
        now = self.clock.monotonic()
        if self._is_local(now) or now < budget.recheck:
            return
        want = min(_batch_cap(limit), max(1, want))
        try:
            task = asyncio.get_running_loop().create_task(self._next_batch(name, limit, budget, want))
        except RuntimeError:  # no event loop: nothing to take ahead with
            return
        budget.ahead = task
        self._ahead.add(task)
        task.add_done_callback(self._ahead.discard)

    async def _next_batch(self, name: str, limit: RateLimit, budget: _Budget, want: int) -> None:
        try:
            answer = await self._ask(name, limit, budget, want)
            if answer is not None and answer[0] > 0:
                budget.next_units = answer[0]
                # its own time: granted at most 100 ms before spent
                budget.next_lapses = self.clock.monotonic() + ALLOWANCE_SECONDS
        finally:
            budget.ahead = None

    async def _ask(self, name: str, limit: RateLimit, budget: _Budget, want: int) -> tuple[int, float] | None:
        """Up to `want` units from Redis → (units granted, seconds until the next is free), a
        refusal remembered in `budget`; None when Redis cannot answer (this worker decides alone)."""
        try:
            granted, wait = await self.store.take_rate(name, limit.per_second, limit.burst, want)
        except (StoreUnavailable, StoreBusy) as exc:
            self._local_until = self.clock.monotonic() + LOCAL_SECONDS
            self._note_local(exc.description)
            return None
        if self._local:
            self._local = False
            log.info("ratelimit.shared_again")
        if granted == 0:
            now = self.clock.monotonic()
            budget.free_at = now + wait
            budget.recheck = now + min(wait, RECHECK_SECONDS)
        return granted, wait

    async def aclose(self) -> None:
        """Stop taking batches ahead (shutdown)."""
        for task in list(self._ahead):
            task.cancel()
        await asyncio.gather(*self._ahead, return_exceptions=True)

    def _is_local(self, now: float) -> bool:
        # The store knows Redis is down (its health probe tells when it is back): no request here
        # waits for a connection attempt to a dead Redis.
        return now < self._local_until or not self.store.reachable

    def _decide_locally(self, name: str, limit: RateLimit, budget: _Budget, now: float) -> None:
        wait = _local_wait(budget, limit, now)
        if wait > 0.0:
            raise self._limited(name, limit, wait)

    def _note_local(self, reason: str) -> None:
        if not self._local:
            self._local = True
            log.warning(
                "ratelimit.local",
                reason=reason,
                note="each worker enforces rate limits on its own until Redis answers: up to workers times the limit",
            )

    def _limited(self, name: str, limit: RateLimit, wait: float) -> RateLimited:
        self.stats.rate_limited(name)
        return RateLimited(name, limit.per_second, limit.burst, wait)

    def _budget(self, name: str) -> _Budget:
        budget = self._budgets.get(name)
        if budget is None:
            if len(self._budgets) >= _MAX_CALLERS:
                self._budgets.clear()
            budget = self._budgets[name] = _Budget()
        return budget


def _batch_cap(limit: RateLimit) -> int:
    """The largest batch: 50 ms of the caller's rate, within its burst, at least one unit."""
    return max(1, min(limit.burst, int(limit.per_second * BATCH_SECONDS)))


def _local_wait(budget: _Budget, limit: RateLimit, now: float) -> float:
    """This worker's own GCRA at the caller's rate and burst: 0.0 → admitted (and counted),
    else the seconds until a unit is free."""
    interval = 1.0 / limit.per_second
    tat = max(budget.local_tat, now)
    wait = tat + interval - limit.burst * interval - now
    if wait > 1e-9:
        return wait
    budget.local_tat = tat + interval
    return 0.0
