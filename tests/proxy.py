"""A TCP proxy for network faults between a broker and Redis, run in a thread of its own.

    proxy = TcpProxy(redis_url).start()     # proxy.url: the Redis URL to give the broker
    proxy.cut_after(b":lock:")              # the next client command containing b":lock:" is
                                            # forwarded, its reply swallowed, the connection cut
    proxy.delay_reply(b":tok:", 2.5)        # the reply to the next such command waits 2.5 s
    proxy.outage(2.5)                       # every connection cut, new ones refused for 2.5 s
    proxy.outage_on(b":lock:", 1.5)         # the same, starting with the next command containing
                                            # b":lock:", which never reaches Redis

Its own thread and event loop: it keeps forwarding while the test blocks (a synchronous
`BrokerProcess.start()` waiting for readiness through it, a `time.sleep`). A rule matches one
chunk of what the client sent (redis-py writes each command in one piece, so on loopback a
command arrives in one read); `count` rules fire that many times. `fired` counts what fired,
`fired_at` says when.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from tests.support import free_port

__all__ = ["TcpProxy"]

_CHUNK = 65536


@dataclass
class _Rule:
    action: str  # "cut", "delay" or "outage"
    pattern: bytes
    count: int
    seconds: float = 0.0


class _Pending:
    """What to do with the reply to the command just forwarded on one connection."""

    def __init__(self) -> None:
        self.rule: _Rule | None = None


class TcpProxy:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.path = parts.path or "/0"
        self.port = free_port()
        self.fired: Counter[str] = Counter()
        self.fired_at: dict[str, float] = {}  # action → time.monotonic() it last fired
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self.path}"

    # -- control, from the test's thread ----------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._run(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut_after(self, pattern: bytes, count: int = 1) -> None:
        """The next `count` client commands containing `pattern` reach Redis (and run there), but
        their reply is dropped and the connection is closed, both ways, before the client sees it."""
        with self._lock:
            self._rules.append(_Rule("cut", pattern, count))

    def delay_reply(self, pattern: bytes, seconds: float, count: int = 1) -> None:
        """The replies to the next `count` client commands containing `pattern` are held back for
        `seconds` (the command itself reaches Redis at once)."""
        with self._lock:
            self._rules.append(_Rule("delay", pattern, count, seconds))

    def outage_on(self, pattern: bytes, seconds: float) -> None:
        """When a client command containing `pattern` comes next, it is dropped (Redis never sees
        it) and an outage of `seconds` begins, as `outage` has it."""
        with self._lock:
            self._rules.append(_Rule("outage", pattern, 1, seconds))

    def outage(self, seconds: float) -> None:
        """Cut every connection now and refuse new ones (nothing listens) for `seconds`; returns
        at once."""
        self._run(self._begin_outage(seconds))
        self.fired["outage"] += 1

    def listening(self) -> bool:
        return self._server is not None

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    # -- the proxy, in its own loop ---------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _begin_outage(self, seconds: float) -> None:
        await self._refuse()
        self._loop.call_later(seconds, self._resume)

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def _resume(self) -> None:
        self._loop.create_task(self._listen())

    async def _shutdown(self) -> None:
        await self._refuse()

    def _take(self, data: bytes) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.pattern in data:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                    self.fired[rule.action] += 1
                    self.fired_at[rule.action] = time.monotonic()
                    return rule
        return None

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        pending = _Pending()

        def close_both() -> None:
            for writer in (client_w, server_w):
                writer.transport.abort()
                self._writers.discard(writer)

        async def upstream() -> None:
            while data := await client_r.read(_CHUNK):
                rule = self._take(data)
                if rule is not None and rule.action == "outage":
                    await self._begin_outage(rule.seconds)
                    return
                if rule is not None:
                    pending.rule = rule  # before the command goes out: its reply may come back at once
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(_CHUNK):
                rule, pending.rule = pending.rule, None
                if rule is not None and rule.action == "cut":
                    close_both()
                    return
                if rule is not None and rule.action == "delay":
                    await asyncio.sleep(rule.seconds)
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        close_both()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
