"""A TCP proxy between a broker and a real redis-server, for network faults a test can switch on.

It runs its own asyncio loop in a thread (the test's blocking calls, e.g. starting a broker, must
not stall it). Each accepted connection is a `Flow`; a flow whose client sent SUBSCRIBE is the
events subscription of some worker. Faults:

- `black_hole(...)`: the chosen flows stop forwarding bytes in both directions; their sockets stay
  open and nothing is closed, so neither end learns anything (a load balancer that forgot an idle
  flow, a partition, a failover without RST). New connections are forwarded normally unless
  `partition()` says otherwise.
- `partition()` / `heal()`: every flow, old and new, stops delivering until `heal()`, which
  delivers what waited (TCP retransmits across a partition: bytes are late, not lost). New
  connections are accepted meanwhile, and wait too.
- `hold_subscriptions()` / `release_subscriptions()`: the next SUBSCRIBE (and everything after it
  on that flow) waits in the proxy until released: a reconnecting subscriber stays unsubscribed
  for exactly as long as the test wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

__all__ = ["Flow", "TcpProxy"]

T = TypeVar("T")


@dataclass
class Flow:
    """One client connection through the proxy, and its own connection to the server."""

    number: int
    server_side: str = ""  # "ip:port" of the proxy's socket to the server, as CLIENT LIST shows it
    subscriber: bool = False  # the client sent SUBSCRIBE on it
    dropping: bool = False  # black hole: bytes read from either side are discarded
    closed: bool = False  # both directions ended
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: bytes wait (hold)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.flows: list[Flow] = []
        self._partitioned = False
        self._hold = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    # -- control, from the test's thread ------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def subscribers(self) -> list[Flow]:
        """The open flows that carry a SUBSCRIBE and forward bytes."""
        return self._run(
            lambda: [f for f in self.flows if f.subscriber and f.gate.is_set() and not (f.dropping or f.closed)]
        )

    def black_hole(self, which: Callable[[Flow], bool]) -> list[Flow]:
        """Stop forwarding on the flows `which` picks; returns them."""

        def apply() -> list[Flow]:
            chosen = [flow for flow in self.flows if which(flow)]
            for flow in chosen:
                flow.dropping = True
                flow.gate.set()  # held bytes are dropped too
            return chosen

        return self._run(apply)

    def partition(self) -> None:
        def apply() -> None:
            self._partitioned = True
            for flow in self.flows:
                flow.gate.clear()

        self._run(apply)

    def heal(self) -> None:
        def apply() -> None:
            self._partitioned = False
            for flow in self.flows:
                flow.gate.set()

        self._run(apply)

    def hold_subscriptions(self) -> None:
        self._run(lambda: setattr(self, "_hold", True))

    def release_subscriptions(self) -> None:
        def apply() -> None:
            self._hold = False
            for flow in self.flows:
                flow.gate.set()

        self._run(apply)

    def held(self) -> int:
        """Open flows whose SUBSCRIBE is waiting in the proxy."""
        return self._run(lambda: sum(1 for f in self.flows if f.subscriber and not (f.gate.is_set() or f.closed)))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for flow in self.flows:
                flow.gate.set()
                for writer in flow.writers:
                    writer.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._call(call())

    # -- the proxy, in its own loop -----------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        flow = Flow(number=len(self.flows))
        if not self._partitioned:
            flow.gate.set()
        self.flows.append(flow)
        flow.writers.append(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        flow.writers.append(server_writer)
        host, port = server_writer.get_extra_info("sockname")[:2]
        flow.server_side = f"{host}:{port}"
        try:
            await asyncio.gather(
                self._pump(flow, client_reader, server_writer, from_client=True),
                self._pump(flow, server_reader, client_writer, from_client=False),
            )
        except asyncio.CancelledError:
            return  # the proxy is stopping (asyncio's server callback must not see the cancellation)
        flow.closed = True

    async def _pump(
        self, flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if from_client and b"SUBSCRIBE" in data and not flow.subscriber:
                    flow.subscriber = True
                    if self._hold:
                        flow.gate.clear()
                await flow.gate.wait()
                if flow.dropping:
                    continue  # a black hole: read and forget, close nothing
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        if not flow.dropping:  # an end closed: pass it on (a black hole passes nothing on)
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.close()
