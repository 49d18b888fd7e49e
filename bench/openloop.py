"""An open-loop HTTP/1.1 load generator: requests leave on a fixed timetable, whatever the server does.

wrk is closed-loop (a slow answer delays the next request, hiding the slowness: coordinated
omission) and Debian has no wrk2. Here request i is due at start + i/rate; it takes an idle
keep-alive connection (waiting for one counts), and its latency is measured from the time it was
due, not from when it was sent. Also reported: how late the generator itself sent (its own lag).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.common import latency_summary_ms, percentile


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status


def raw_request(url: str, headers: dict[str, str], method: str = "GET", body: bytes = b"") -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return parts.hostname or "127.0.0.1", parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _run(url: str, headers: dict[str, str], rate: float, seconds: float, connections: int) -> dict[str, Any]:
    host, port, raw = raw_request(url, headers)
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        reader, writer = await asyncio.open_connection(host, port)
        idle.put_nowait(_Connection(reader, writer))
    latencies: list[float] = []
    services: list[float] = []
    lags: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        connection = await idle.get()
        sent = time.perf_counter()
        lags.append(sent - due)
        try:
            status = await connection.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            return
        done = time.perf_counter()
        latencies.append(done - due)
        services.append(done - sent)
        statuses[status] = statuses.get(status, 0) + 1
        idle.put_nowait(connection)

    total = round(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.05
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    while not idle.empty():
        idle.get_nowait().writer.close()
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": total,
        "completed": len(latencies),
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        **latency_summary_ms(latencies),
        # From the actual send: what the server alone added, without the generator's lateness.
        "service_p50_ms": round(percentile(services, 50) * 1000, 3),
        "service_p99_ms": round(percentile(services, 99) * 1000, 3),
        "generator_send_lag_p99_ms": round(percentile(lags, 99) * 1000, 3),
    }


def run(
    url: str, headers: dict[str, str], *, rate: float, seconds: float, warmup: float, connections: int = 32
) -> dict[str, Any]:
    """Warm up at the same rate, then measure; latencies from each request's due time."""
    import uvloop

    async def both() -> dict[str, Any]:
        if warmup > 0:
            await _run(url, headers, rate, warmup, connections)
        return await _run(url, headers, rate, seconds, connections)

    return uvloop.run(both())
