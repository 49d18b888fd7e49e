"""Hits of a rate-limited caller (spec §6.6): what counting a caller's rate limit costs an L1 hit.

The caller's limit is high enough never to refuse (1,000,000/s), so every request is an L1 hit
that also spends a unit of the worker's allowance, taking a batch from Redis when it runs out
(broker/ratelimit.py). One broker (1 worker) with two callers, `bench` (unlimited) and
`limited`, against the same bare-Starlette baseline; the runs alternate baseline, unlimited,
limited, so drift on a shared machine hits all three alike. Target: limited rps at least the baseline's.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from bench import wrk
from bench.baseline import PATH as BASELINE_PATH
from bench.common import CREDENTIAL, HIT_SCOPE, SCOPES, Caller, broker, get_token, median, server
from bench.hits import _body_bytes, hit_url
from bench.wrk import WrkSettings
from broker.callers import hash_key

TARGET = 1.0
PER_SECOND = 1_000_000


def caller_table(caller: Caller) -> str:
    """A `[callers.NAME]` table for the bench config: every scope of the bench credential, limited."""
    scopes = ", ".join(f'"{s}"' for s in SCOPES)
    return textwrap.dedent(
        f"""
        [callers.{caller.name}]
        key_sha256 = "{hash_key(caller.key)}"
        rate_limit_per_second = {PER_SECOND}
        [callers.{caller.name}.grants]
        {CREDENTIAL} = [{scopes}]
        """
    )


def run(config: Path, unlimited: Caller, limited: Caller, rounds: int, settings: WrkSettings) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "unlimited": [], "limited": []}
    with broker(config, 1) as proc:
        url = hit_url(proc.url)
        token = get_token(f"{proc.url}/v1/tokens/{CREDENTIAL}", unlimited, HIT_SCOPE)
        get_token(f"{proc.url}/v1/tokens/{CREDENTIAL}", limited, HIT_SCOPE)
        common = ["--workers", "1", "--body-bytes", str(_body_bytes(token))]
        with server("bench.baseline", common, BASELINE_PATH) as base:
            for _ in range(rounds):
                runs["baseline"].append(wrk.measure(base.url + BASELINE_PATH, {}, settings))
                runs["unlimited"].append(wrk.measure(url, unlimited.headers, settings))
                runs["limited"].append(wrk.measure(url, limited.headers, settings))
    base_rps = [r["rps"] for r in runs["baseline"]]
    result: dict[str, Any] = {"workers": 1, "per_second": PER_SECOND, "baseline_rps": base_rps}
    for name in ("unlimited", "limited"):
        rps = [r["rps"] for r in runs[name]]
        result[f"{name}_rps"] = rps
        result[f"{name}_ratio"] = round(median([b / a for a, b in zip(base_rps, rps, strict=True)]), 3)
        result[f"{name}_p99_ms"] = round(median([r["latency_ms"]["p99"] for r in runs[name]]), 3)
    result["counting_cost"] = round(1 - median(result["limited_rps"]) / median(result["unlimited_rps"]), 3)
    result["errors"] = sum(r["non_2xx_or_errors"] for rs in runs.values() for r in rs)
    result["target"] = TARGET
    result["pass"] = result["limited_ratio"] >= TARGET and result["errors"] == 0
    return result
