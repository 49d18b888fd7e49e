"""Closed-loop load with wrk: keep-alive, 1 thread, 32 connections (the issue's settings)."""

from __future__ import annotations

import json
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


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk")
    return found


def run(url: str, headers: dict[str, str], seconds: float, settings: WrkSettings) -> dict[str, Any]:
    """One wrk run against url; the result has rps, latency (ms) and error counts."""
    cmd = [
        wrk_binary(),
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
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no report: {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = raw["errors"]
    lat = raw["latency_us"]
    return {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "requests": raw["requests"],
        "non_2xx_or_errors": sum(errors.values()),
        "errors": errors,
        "latency_ms": {k: round(v / 1000, 3) for k, v in lat.items()},
    }


def measure(url: str, headers: dict[str, str], settings: WrkSettings) -> dict[str, Any]:
    """Warm up, then measure."""
    if settings.warmup > 0:
        run(url, headers, settings.warmup, settings)
    return run(url, headers, settings.duration, settings)
