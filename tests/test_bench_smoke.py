"""The benchmark suite runs end to end (`python -m bench --smoke`) and writes what README shows.

No timing is asserted here: only that every scenario ran and reported its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import UVICORN_SETTINGS
from broker import process
from tests.support import REPO_ROOT


def test_the_baseline_runs_under_the_brokers_uvicorn_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    # what run_uvicorn sets up for a real server, undone after the test
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    process.run_uvicorn("127.0.0.1", 8080, 2)
    for per_run in ("host", "port", "workers", "factory"):
        seen.pop(per_run)
    assert seen == UVICORN_SETTINGS


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    # 3: a target was missed, which a one-second run may well do; anything else is a failure.
    assert done.returncode in {0, 3}, done.stdout + done.stderr
    result = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    throughput = result["throughput"]["1"]
    assert throughput["baseline_rps"][0] > 0
    assert throughput["broker_rps"][0] > 0
    assert throughput["errors"] == 0
    assert {"median_ratio", "pass", "stretch_pass", "body_bytes"} <= set(throughput)

    latency = result["latency"]
    assert latency["broker"][0]["statuses"] == {"200": latency["broker"][0]["requests"]}
    assert {"baseline_p99_ms", "broker_p99_ms", "p99_delta_ms", "pass"} <= set(latency)

    facade = result["facade"]
    assert facade["facade_rps"][0] > 0
    assert facade["baseline_rps"][0] > 0
    assert facade["errors"] == 0
    assert {"median_ratio", "pass", "body_bytes", "target"} <= set(facade)

    limited = result["limited"]
    assert limited["errors"] == 0
    assert limited["limited_rps"][0] > 0
    assert {"limited_ratio", "unlimited_ratio", "counting_cost", "pass"} <= set(limited)

    jwt = result["jwt"]
    assert jwt["jwt_rps"][0] > 0
    assert jwt["errors"] == 0
    assert jwt["key_set_requests"] == 1  # every hit after the first: the token remembered, no key set fetch
    assert {"jwt_ratio", "key_ratio", "jwt_vs_key", "pass"} <= set(jwt)

    stampede = result["stampede"]
    assert stampede["upstream_requests"] == 1
    assert stampede["statuses"] == {"200": stampede["requests"]}
    assert {"p50_ms", "p99_ms"} <= set(stampede)

    fleet = result["fleet"]
    assert fleet["broker"]["errors"] == fleet["per_process_library"]["errors"] == 0
    assert fleet["broker"]["upstream_requests"] >= 1
    assert fleet["per_process_library"]["upstream_requests"] >= fleet["clients"]

    memory = result["memory"]
    assert memory["second_pass_sources"] == {"l1": memory["entries"]}
    assert {"rss_per_entry_bytes", "l1_entry_bytes", "fast_path_encoded_bytes", "beyond_bound"} <= set(memory)

    profile = result["profile"]["fast_path"]
    assert profile["samples"] > 0
    assert profile["top_self"]

    assert {row["figure"].split(":")[0].split(",")[0] for row in result["summary"]} >= {
        "hit throughput",
        "cold stampede",
        "memory",
    }
