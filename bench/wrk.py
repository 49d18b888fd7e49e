"""Closed-loop load with wrk: keep-alive, 1 thread, 32 connections (the issue's settings).

Without wrk on PATH (`make bench` installs it), a Python closed loop stands in so that the suite
still runs end to end (the smoke test on a bare machine); its rps say more about the Python client
than about the server, and every result names the generator that produced it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_LUA = Path(__file__).with_name("report.lua")


@dataclass(frozen=True)
class WrkSettings:
    threads: int = 1
    connections: int = 32
    duration: float = 10.0
    warmup: float = 2.0
    timeout: float = 5.0


def generator() -> str:
    return "wrk" if shutil.which("wrk") else "python closed loop (wrk not installed: rps not comparable)"


def run(
    url: str, headers: dict[str, str], seconds: float, settings: WrkSettings, method: str = "GET", body: str = ""
) -> dict[str, Any]:
    """One wrk run against url; the result has rps, latency (ms) and error counts."""
    binary = shutil.which("wrk")
    if binary is None:
        return _python_closed_loop(url, headers, seconds, settings, method, body)
    cmd = [
        binary,
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={settings.timeout:g}s",
        "-s",
        str(REPORT_LUA),
    ]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    env = {**os.environ, "WRK_METHOD": method, "WRK_BODY": body}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no report: {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = raw["errors"]
    lat = raw["latency_us"]
    return {
        "generator": "wrk",
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "requests": raw["requests"],
        "non_2xx_or_errors": sum(errors.values()),
        "errors": errors,
        "latency_ms": {k: round(v / 1000, 3) for k, v in lat.items()},
    }


def measure(
    url: str, headers: dict[str, str], settings: WrkSettings, method: str = "GET", body: str = ""
) -> dict[str, Any]:
    """Warm up, then measure."""
    if settings.warmup > 0:
        run(url, headers, settings.warmup, settings, method, body)
    return run(url, headers, settings.duration, settings, method, body)


def _python_closed_loop(
    url: str, headers: dict[str, str], seconds: float, settings: WrkSettings, method: str = "GET", body: str = ""
) -> dict[str, Any]:
    import asyncio
    import time

    import uvloop

    from bench.common import percentile
    from bench.openloop import _Connection, raw_request

    host, port, raw = raw_request(url, headers, method, body.encode())
    latencies: list[float] = []
    errors = 0

    async def connection(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        client = _Connection(reader, writer)
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            if await client.request(raw) >= 400:
                errors += 1
            latencies.append(time.perf_counter() - began)
        writer.close()

    async def all_connections() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(connection(began + seconds) for _ in range(settings.connections)))
        return time.perf_counter() - began

    elapsed = uvloop.run(all_connections())
    return {
        "generator": "python",
        "rps": round(len(latencies) / elapsed, 1),
        "requests": len(latencies),
        "non_2xx_or_errors": errors,
        "errors": {"status": errors},
        "latency_ms": {
            "mean": round(sum(latencies) / max(1, len(latencies)) * 1000, 3),
            "max": round(max(latencies, default=0.0) * 1000, 3),
            **{k: round(percentile(latencies, q) * 1000, 3) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))},
            "p999": round(percentile(latencies, 99.9) * 1000, 3),
        },
    }
