"""Target 3: a cold stampede. 2 broker instances x 2 workers on one Redis; 1,000 requests for one
cold key arrive at once, spread over both instances → exactly one upstream token request.

The authorization server is slowed down (`delay`) so that every request arrives while the one
fetch is still in flight. Connections are opened first, then every request is written at once;
latency is measured from that common start to the end of each answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench.common import CREDENTIAL, Caller, broker, latency_summary_ms
from bench.openloop import raw_request
from tests.support import AuthServerProcess

COLD_SCOPE = "urn:bench:s14 urn:bench:s15"


async def _stampede(urls: list[str], headers: dict[str, str], total: int) -> dict[str, Any]:
    connections = []
    for i in range(total):
        host, port, raw = raw_request(urls[i % len(urls)], headers)
        reader, writer = await asyncio.open_connection(host, port)
        connections.append((reader, writer, raw))
    go = asyncio.Event()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tokens: set[str] = set()
    start = 0.0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> None:
        await go.wait()
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(x[15:]) for x in head.split(b"\r\n") if x[:15].lower() == b"content-length:")
        body = await reader.readexactly(length)
        latencies.append(time.perf_counter() - start)
        status = head[9:12].decode()
        statuses[status] = statuses.get(status, 0) + 1
        if status == "200":
            tokens.add(json.loads(body)["access_token"])
        writer.close()

    tasks = [asyncio.create_task(one(*c)) for c in connections]
    await asyncio.sleep(0.2)  # every task is parked on the event
    start = time.perf_counter()
    go.set()
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    failures = sum(1 for t in done if t.exception() is not None) + len(pending)
    with contextlib.suppress(Exception):
        await asyncio.gather(*pending, return_exceptions=True)
    return {
        "requests": total,
        "statuses": dict(sorted(statuses.items())),
        "client_failures": failures,
        "distinct_tokens": len(tokens),
        **latency_summary_ms(latencies),
    }


def run(
    config: Path,
    caller: Caller,
    authserver: AuthServerProcess,
    *,
    instances: int,
    workers: int,
    requests: int,
    upstream_delay: float,
) -> dict[str, Any]:
    import uvloop

    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(broker(config, workers)) for _ in range(instances)]
        authserver.reset()
        authserver.configure(delay=upstream_delay)
        urls = [f"{p.url}/v1/tokens/{CREDENTIAL}?scope={COLD_SCOPE.replace(' ', '%20')}" for p in procs]
        result = uvloop.run(_stampede(urls, caller.headers, requests))
        upstream = authserver.token_requests()
        authserver.reset()
    result.update(
        instances=instances,
        workers_per_instance=workers,
        upstream_delay_s=upstream_delay,
        upstream_requests=upstream,
        target_upstream_requests=1,
    )
    result["pass"] = upstream == 1 and result["statuses"] == {"200": requests} and result["distinct_tokens"] == 1
    return result
