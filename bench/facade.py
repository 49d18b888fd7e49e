"""Issue 12: facade hit throughput. `POST /oauth2/{credential}/token` (a form body, HTTP Basic
client authentication, an L1 hit) against the bare Starlette baseline answering the same POST
with a body of the same size; 1 worker each, alternating, median of the paired ratios.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from bench import wrk
from bench.baseline import PATH as BASELINE_PATH
from bench.common import CREDENTIAL, HIT_SCOPE, Caller, broker, median, server
from bench.wrk import WrkSettings

TARGET = 1.0
PUBLIC_URL = "http://127.0.0.1"  # the token endpoint does not depend on it; discovery is not measured


def facade_config(text: str) -> str:
    """A bench broker config with the facade on."""
    return text + f'\n[server]\npublic_url = "{PUBLIC_URL}"\n'


def token_request(caller: Caller) -> tuple[dict[str, str], str]:
    """What openid-client or Authlib send: Basic credentials and a form with grant type and scope."""
    basic = base64.b64encode(f"{caller.name}:{caller.key}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"}
    return headers, f"grant_type=client_credentials&scope={quote(HIT_SCOPE)}"


def run(config: Path, caller: Caller, rounds: int, settings: WrkSettings) -> dict[str, Any]:
    headers, body = token_request(caller)
    with broker(config, 1) as proc:
        url = f"{proc.url}/oauth2/{CREDENTIAL}/token"
        first = httpx.post(url, headers=headers, content=body, timeout=10, trust_env=False)
        first.raise_for_status()
        size = len(json.dumps(first.json(), separators=(",", ":"), ensure_ascii=False).encode())
        with server("bench.baseline", ["--workers", "1", "--body-bytes", str(size)], BASELINE_PATH) as base:
            baseline_url = base.url + BASELINE_PATH
            runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "facade": []}
            for _ in range(rounds):
                runs["baseline"].append(wrk.measure(baseline_url, headers, settings, "POST", body))
                runs["facade"].append(wrk.measure(url, headers, settings, "POST", body))
    ratios = [f["rps"] / b["rps"] for b, f in zip(runs["baseline"], runs["facade"], strict=True)]
    errors = sum(r["non_2xx_or_errors"] for rs in runs.values() for r in rs)
    return {
        "workers": 1,
        "body_bytes": size,
        "request": "POST form (grant_type, scope) with HTTP Basic client authentication",
        "baseline_rps": [r["rps"] for r in runs["baseline"]],
        "facade_rps": [r["rps"] for r in runs["facade"]],
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(median(ratios), 3),
        "baseline_p99_ms": round(median([r["latency_ms"]["p99"] for r in runs["baseline"]]), 3),
        "facade_p99_ms": round(median([r["latency_ms"]["p99"] for r in runs["facade"]]), 3),
        "errors": errors,
        "target": TARGET,
        "pass": median(ratios) >= TARGET and errors == 0,
    }
