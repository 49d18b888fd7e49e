"""The events channel: every worker's subscription to the token writes and drops of the fleet (spec §4.3).

Store writes publish on the channel (its Lua scripts do); each worker's EventSubscriber keeps its L1
current from them. What the subscriber tells its owner through `on_state`:

- `on_state(True)` on every subscribe confirmation, also one that arrives while already live (a
  client library that re-subscribes by itself after a lost connection): events published before it
  may have been missed, so the owner starts L1 afresh each time.
- `on_state(False)` as soon as the subscription is lost: an error on its connection, or a silent
  one. Pub/sub has no replies to wait for, so a connection that died without a FIN or RST (a load
  balancer that dropped an idle flow, a partition, a failover) would otherwise look like a quiet
  channel forever. The subscriber sends a PING on the subscribed connection after every
  HEARTBEAT_INTERVAL of silence; nothing at all (no event, no pong) for HEARTBEAT_TIMEOUT means the
  subscription is gone: it is reported lost, its connection closed, and a new one made.

While not live, the owner must not serve from L1 while Redis answers. The copies may be kept for
the Redis-unreachable rule: the reconnect right after the loss is what tells whether Redis still
answers, and when it does, its confirmation clears L1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from broker.tasks import cancel

__all__ = ["HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT", "Event", "EventSubscriber", "SubscriptionLost"]

log = structlog.get_logger("broker.events")

# A PING after this much silence on the subscription: a few bytes a second per worker.
HEARTBEAT_INTERVAL = 1.0
# No event and no pong for this long: the subscription is lost. Three intervals: two PINGs went
# unanswered for at least 2 s (a command slower than 1 s already counts as Redis being down), so
# a busy Redis or a slow link does not flap the subscription, and a worker that misses events
# stops serving L1 within 3 s.
HEARTBEAT_TIMEOUT = 3.0
_HEARTBEAT = "tb-heartbeat"  # not redis-py's own health-check payload, whose pong it swallows
_FIRST_RETRY = 0.1
_MAX_RETRY = 2.0


@dataclass(frozen=True, slots=True)
class Event:
    op: str  # "set" or "drop"
    key: str
    fingerprint: str


class SubscriptionLost(Exception):
    """The subscription stopped delivering (silent connection, or an unsubscribe we did not ask for)."""


class EventSubscriber:
    """Listens on the events channel and keeps `live` true only while subscribed.

    While not live, the token service must not serve from L1: it could miss an invalidation.
    """

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        channel: str,
        on_event: Callable[[Event], None],
        on_state: Callable[[bool], None],
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.on_event = on_event
        self.on_state = on_state
        self.live = False
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._delay = _FIRST_RETRY
        self._warned = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tb-events")

    async def wait_live(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._subscribed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    def _confirmed(self) -> None:
        """A subscribe confirmation: a new subscription, even if we thought we had one."""
        if self.live:
            log.info("store.events_resubscribed", note="events may have been missed: L1 starts afresh")
        else:
            log.debug("store.events_subscribed")
        self.live = True
        self.on_state(True)
        self._subscribed.set()
        self._delay, self._warned = _FIRST_RETRY, False

    def _lost(self) -> None:
        if self.live:
            self.live = False
            self.on_state(False)
        self._subscribed.clear()

    async def _run(self) -> None:
        while True:
            pubsub: Any = None
            try:
                if isinstance(self.redis, RedisCluster):
                    # A cluster client routes SUBSCRIBE by the channel's slot: it needs the slot map
                    # first. PUBLISH reaches every node of a cluster, so any one node will do.
                    await self.redis.initialize()
                pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
                await pubsub.subscribe(self.channel)
                await self._listen(pubsub)
            except asyncio.CancelledError:
                self._lost()
                await self._close(pubsub)
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it was, a dead subscriber would leave L1 off for good
                self._lost()
                if not self._warned:
                    # The detail says why (refused, TLS verification failed, auth, silent…); no secrets in it.
                    log.warning("store.events_unsubscribed", reason=type(exc).__name__, detail=str(exc)[:300])
                    self._warned = True
            await self._close(pubsub)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, _MAX_RETRY)

    async def _listen(self, pubsub: Any) -> None:
        """Read the subscription until it fails; a PING after each HEARTBEAT_INTERVAL of silence.

        Returns only by raising: a redis-py error, or SubscriptionLost after HEARTBEAT_TIMEOUT
        without a message (the SUBSCRIBE's own confirmation included)."""
        clock = asyncio.get_running_loop().time
        heard = pinged = clock()
        while True:
            now = clock()
            if now - heard >= HEARTBEAT_TIMEOUT:
                raise SubscriptionLost(f"nothing from Redis on the subscription for {HEARTBEAT_TIMEOUT:g} s")
            if now - max(heard, pinged) >= HEARTBEAT_INTERVAL:
                await pubsub.ping(_HEARTBEAT)
                pinged = now
            wake = min(max(heard, pinged) + HEARTBEAT_INTERVAL, heard + HEARTBEAT_TIMEOUT)
            message = await pubsub.get_message(timeout=max(wake - clock(), 0.001))
            if message is None:
                continue
            heard = clock()
            kind = message.get("type")
            if kind == "subscribe":
                self._confirmed()
            elif kind == "message":
                event = self._parse(message.get("data"))
                if event is not None:
                    self.on_event(event)
            elif kind == "unsubscribe":
                raise SubscriptionLost("the server ended the subscription")

    @staticmethod
    async def _close(pubsub: Any) -> None:
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    @staticmethod
    def _parse(data: Any) -> Event | None:
        if not isinstance(data, bytes):
            return None
        try:
            op, fp, key = data.decode().split("|", 2)
        except ValueError:
            return None
        return Event(op=op, key=key, fingerprint=fp)
