"""Target 6: where a hit's time goes. py-spy samples a broker worker while wrk drives L1 hits.

The raw (collapsed-stack) output is summarised into the share of samples per function, inclusive
(anywhere on the stack) and self (on top of it), and per layer (uvicorn, starlette, broker, ...).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench import wrk
from bench.wrk import WrkSettings

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# First match wins: which layer a frame's file belongs to.
LAYERS = (
    ("broker.api.fastpath", "broker/api/fastpath.py"),
    ("broker.api (starlette routes and middleware)", "broker/api/"),
    ("broker.tokens", "broker/tokens.py"),
    ("broker.callers", "broker/callers.py"),
    ("broker.audit", "broker/audit.py"),
    ("broker (other)", "broker/"),
    ("starlette", "starlette/"),
    ("uvicorn", "uvicorn/"),
    ("structlog/logging", "structlog/"),
    ("logging", "logging/"),
    ("json", "json/"),
    ("asyncio", "asyncio/"),
)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


def _func(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    file = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['func']} ({file})", file


def _layer(file: str) -> str:
    for name, marker in LAYERS:
        if marker in file:
            return name
    return "other (interpreter, uvloop, httptools C code)"


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_func(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f[0].startswith("<module>") and "process " not in f[0]]
        if not frames:
            continue
        for name in {name for name, _ in frames}:
            inclusive[name] += count
        leaf_name, leaf_file = frames[-1]
        own[leaf_name] += count
        layers[_layer(leaf_file)] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        # Frames on (nearly) every stack are the server's entry points: they say nothing.
        shown = [(k, v) for k, v in counter.most_common() if v < 0.95 * total]
        return [{"function": k, "pct": round(100 * v / total, 1)} for k, v in shown[:top]]

    return {
        "samples": total,
        "self_by_layer": {k: round(100 * v / total, 1) for k, v in layers.most_common()},
        "top_self": share(own),
        "top_inclusive": share(inclusive),
    }


def record(
    pid: int,
    url: str,
    headers: dict[str, str],
    seconds: float,
    out: Path,
    settings: WrkSettings,
    method: str = "GET",
    body: str = "",
) -> dict[str, Any]:
    """Drive hits with wrk for `seconds` while py-spy samples `pid`; summary of the samples."""
    wrk.run(url, headers, max(1.0, settings.warmup), settings, method, body)
    load = threading.Thread(target=wrk.run, args=(url, headers, seconds + 2, settings, method, body), daemon=True)
    load.start()
    try:
        subprocess.run(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        load.join()
    return summarise(out.read_text())
