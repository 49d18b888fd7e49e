"""Targets 1 and 2: hit throughput (wrk, closed loop) and hit latency (open loop at a fixed rate).

The broker is a real `token-broker serve` process; the baseline a bare Starlette app under the
same uvicorn settings and worker count, answering a body of the same size. Runs alternate
baseline, broker, baseline, broker, ... so drift on a shared machine hits both alike, and the
median ratio is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import openloop, wrk
from bench.baseline import PATH as BASELINE_PATH
from bench.common import CREDENTIAL, HIT_SCOPE, Caller, broker, get_token, median, server
from bench.wrk import WrkSettings

THROUGHPUT_TARGET = 0.85
THROUGHPUT_STRETCH = 1.0
LATENCY_TARGET_MS = 1.0  # broker p99 <= baseline p99 + this


@dataclass(frozen=True)
class LatencySettings:
    rate: float = 1000.0
    seconds: float = 10.0
    warmup: float = 2.0
    rounds: int = 2


def hit_url(base: str) -> str:
    return f"{base}/v1/tokens/{CREDENTIAL}?scope={HIT_SCOPE.replace(' ', '%20')}"


def _body_bytes(token: dict[str, Any]) -> int:
    return len(json.dumps(token, separators=(",", ":"), ensure_ascii=False).encode())


def run(
    config: Path,
    caller: Caller,
    workers: int,
    rounds: int,
    settings: WrkSettings,
    latency: LatencySettings | None = None,
    references: bool = False,
) -> dict[str, Any]:
    """Throughput at `workers` (and latency, if asked) for the broker and the baseline."""
    with broker(config, workers) as proc:
        url = hit_url(proc.url)
        token = get_token(f"{proc.url}/v1/tokens/{CREDENTIAL}", caller, HIT_SCOPE)
        size = _body_bytes(token)
        common = ["--workers", str(workers), "--body-bytes", str(size)]
        with server("bench.baseline", common, BASELINE_PATH) as base:
            baseline_url = base.url + BASELINE_PATH
            runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "broker": []}
            for _ in range(rounds):
                runs["baseline"].append(wrk.measure(baseline_url, {}, settings))
                runs["broker"].append(wrk.measure(url, caller.headers, settings))
            open_runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "broker": []}
            for _ in range(latency.rounds if latency else 0):
                assert latency is not None
                for name, target, headers in (("baseline", baseline_url, {}), ("broker", url, caller.headers)):
                    open_runs[name].append(
                        openloop.run(target, headers, rate=latency.rate, seconds=latency.seconds, warmup=latency.warmup)
                    )
        extra: dict[str, Any] = {}
        if references:
            # Context, measured once each: the ceiling of this uvicorn, and the broker without its fast path.
            with server("bench.baseline", [*common, "--kind", "asgi"], BASELINE_PATH) as ceiling:
                extra["pure_asgi_preencoded"] = wrk.measure(ceiling.url + BASELINE_PATH, {}, settings)
            with server("bench.starlette_path", ["--config", str(config), "--workers", str(workers)], "/healthz") as s:
                get_token(f"{s.url}/v1/tokens/{CREDENTIAL}", caller, HIT_SCOPE)
                extra["broker_without_fast_path"] = wrk.measure(hit_url(s.url), caller.headers, settings)
    ratios = [b["rps"] / a["rps"] for a, b in zip(runs["baseline"], runs["broker"], strict=True)]
    errors = sum(r["non_2xx_or_errors"] for rs in runs.values() for r in rs)
    throughput: dict[str, Any] = {
        "workers": workers,
        "body_bytes": size,
        "baseline_rps": [r["rps"] for r in runs["baseline"]],
        "broker_rps": [r["rps"] for r in runs["broker"]],
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(median(ratios), 3),
        "baseline_p99_ms": round(median([r["latency_ms"]["p99"] for r in runs["baseline"]]), 3),
        "broker_p99_ms": round(median([r["latency_ms"]["p99"] for r in runs["broker"]]), 3),
        "errors": errors,
        "target": THROUGHPUT_TARGET,
        "stretch": THROUGHPUT_STRETCH,
    }
    throughput["pass"] = throughput["median_ratio"] >= THROUGHPUT_TARGET and errors == 0
    throughput["stretch_pass"] = throughput["median_ratio"] >= THROUGHPUT_STRETCH and errors == 0
    if extra:
        base_rps = median(throughput["baseline_rps"])
        throughput["references"] = {
            name: {"rps": r["rps"], "ratio": round(r["rps"] / base_rps, 3), "p99_ms": r["latency_ms"]["p99"]}
            for name, r in extra.items()
        }
    result: dict[str, Any] = {"throughput": throughput}
    if latency is not None:
        result["latency"] = _latency_result(workers, latency, open_runs)
    return result


def _latency_result(workers: int, settings: LatencySettings, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    baseline_p99 = round(median([r["p99_ms"] for r in runs["baseline"]]), 3)
    broker_p99 = round(median([r["p99_ms"] for r in runs["broker"]]), 3)
    ok = all(r["errors"] == 0 and set(r["statuses"]) == {"200"} for rs in runs.values() for r in rs)
    return {
        "workers": workers,
        "rate_rps": settings.rate,
        "seconds": settings.seconds,
        "rounds": settings.rounds,
        "baseline": runs["baseline"],
        "broker": runs["broker"],
        "baseline_p50_ms": round(median([r["p50_ms"] for r in runs["baseline"]]), 3),
        "broker_p50_ms": round(median([r["p50_ms"] for r in runs["broker"]]), 3),
        "baseline_service_p99_ms": round(median([r["service_p99_ms"] for r in runs["baseline"]]), 3),
        "broker_service_p99_ms": round(median([r["service_p99_ms"] for r in runs["broker"]]), 3),
        "baseline_p99_ms": baseline_p99,
        "broker_p99_ms": broker_p99,
        "p99_delta_ms": round(broker_p99 - baseline_p99, 3),
        "target_delta_ms": LATENCY_TARGET_MS,
        "pass": ok and broker_p99 <= baseline_p99 + LATENCY_TARGET_MS,
    }


def run_l2(config: Path, caller: Caller, rounds: int, settings: WrkSettings) -> dict[str, Any]:
    """Hits with L1 off (`l1_max_entries = 0`, 1 worker): every hit reads Redis and, encrypted,
    opens one AES-GCM value. Encrypted and `--insecure-plaintext-cache` brokers against the
    same baseline, alternating, so the figure is what encryption costs an L2 hit."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "encrypted": [], "plaintext": []}
    with broker(config, 1) as sealed, broker(config, 1, encrypted=False) as plain:
        urls = {"encrypted": hit_url(sealed.url), "plaintext": hit_url(plain.url)}
        token = get_token(f"{sealed.url}/v1/tokens/{CREDENTIAL}", caller, HIT_SCOPE)
        get_token(f"{plain.url}/v1/tokens/{CREDENTIAL}", caller, HIT_SCOPE)
        common = ["--workers", "1", "--body-bytes", str(_body_bytes(token))]
        with server("bench.baseline", common, BASELINE_PATH) as base:
            for _ in range(rounds):
                runs["baseline"].append(wrk.measure(base.url + BASELINE_PATH, {}, settings))
                for name, url in urls.items():
                    runs[name].append(wrk.measure(url, caller.headers, settings))
    base_rps = [r["rps"] for r in runs["baseline"]]
    result: dict[str, Any] = {"workers": 1, "baseline_rps": base_rps}
    for name in ("encrypted", "plaintext"):
        rps = [r["rps"] for r in runs[name]]
        result[f"{name}_rps"] = rps
        result[f"{name}_ratio"] = round(median([b / a for a, b in zip(base_rps, rps, strict=True)]), 3)
        result[f"{name}_p99_ms"] = round(median([r["latency_ms"]["p99"] for r in runs[name]]), 3)
    result["encryption_cost"] = round(1 - median(result["encrypted_rps"]) / median(result["plaintext_rps"]), 3)
    result["errors"] = sum(r["non_2xx_or_errors"] for rs in runs.values() for r in rs)
    result["pass"] = result["errors"] == 0
    return result
