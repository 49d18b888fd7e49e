"""The events channel: every worker's subscription to the token writes and drops of the fleet (spec §4.3).

Store writes publish on the channel (its Lua scripts do); each worker's EventSubscriber keeps its L1
current from them. While the subscription is down the token service must not serve from L1.
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

__all__ = ["Event", "EventSubscriber"]

log = structlog.get_logger("broker.events")


@dataclass(frozen=True, slots=True)
class Event:
    op: str  # "set" or "drop"
    key: str
    fingerprint: str


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

    def _set_live(self, live: bool) -> None:
        if live != self.live:
            self.live = live
            self.on_state(live)
        if live:
            self._subscribed.set()
        else:
            self._subscribed.clear()

    async def _run(self) -> None:
        delay = 0.1
        warned = False
        while True:
            pubsub: Any = None
            try:
                if isinstance(self.redis, RedisCluster):
                    # A cluster client routes SUBSCRIBE by the channel's slot: it needs the slot map
                    # first. PUBLISH reaches every node of a cluster, so any one node will do.
                    await self.redis.initialize()
                pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "subscribe":
                        self._set_live(True)
                        delay, warned = 0.1, False
                        log.debug("store.events_subscribed")
                    elif kind == "message":
                        event = self._parse(message.get("data"))
                        if event is not None:
                            self.on_event(event)
            except asyncio.CancelledError:
                self._set_live(False)
                await self._close(pubsub)
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it was, a dead subscriber would leave L1 off for good
                self._set_live(False)
                if not warned:
                    # The detail says why (refused, TLS verification failed, auth…); no secrets in it.
                    log.warning("store.events_unsubscribed", reason=type(exc).__name__, detail=str(exc)[:300])
                    warned = True
            await self._close(pubsub)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

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
