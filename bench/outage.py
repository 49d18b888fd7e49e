"""An upstream outage under steady load: `python -m bench.outage [--seconds 60] [--rate 50]`.

Starts a redis-server, the test authorization server (tokens living `--lifetime` seconds) and a
real `token-broker serve` with 2 workers and default resilience settings, then sends a steady
open-loop stream of token requests (`--rate` per second over a few scope sets). Half-way through,
the authorization server starts answering 503 (with Retry-After: 1) to every token request and
keeps doing so until the end.

Prints and writes JSON (default bench/results/outage.json): requests served, errors seen by
callers (by status and error code, and by phase), upstream calls made (before/after the
switch), what the circuit breakers did (from the broker's log), and a per-second timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import CREDENTIAL, SCOPES, Caller, broker, broker_config, latency_summary_ms, write_config
from broker.embedded_redis import EmbeddedRedis
from broker.entries import fingerprint
from tests.support import REPO_ROOT, AuthServerProcess

SCOPE_SETS = (SCOPES[0], SCOPES[1], f"{SCOPES[0]} {SCOPES[1]}", SCOPES[2])
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "outage.json"


async def _load(
    url: str, caller: Caller, authserver: AuthServerProcess, seconds: float, rate: float, fail_at: float
) -> tuple[float, float, int, list[dict[str, Any]]]:
    """Open loop: request i is sent at start + i/rate whatever happened to the others.
    → (start wall time, switch wall time, upstream requests before the switch, results)."""
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, trust_env=False) as client:

        async def one(i: int, scheduled: float) -> None:
            scope = SCOPE_SETS[i % len(SCOPE_SETS)]
            record: dict[str, Any] = {"t": scheduled - start, "scope": scope}
            try:
                response = await client.get(f"/v1/tokens/{CREDENTIAL}", params={"scope": scope}, headers=caller.headers)
            except httpx.HTTPError as exc:
                record.update(status=0, error=f"client:{type(exc).__name__}")
            else:
                body = response.json()
                record.update(status=response.status_code, error=body.get("error"))
                if response.status_code == 200:
                    record["fp"] = fingerprint(body["access_token"])
                    record["expires_in"] = body["expires_in"]
                else:
                    record["retry_after"] = response.headers.get("retry-after")
            record["latency"] = time.monotonic() - scheduled
            results.append(record)

        start_wall, start = time.time(), time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        switched_wall, upstream_before = 0.0, 0
        total = int(seconds * rate)
        for i in range(total):
            scheduled = start + i / rate
            if not switched_wall and scheduled - start >= fail_at:
                upstream_before = authserver.token_requests()
                authserver.configure(fault="503")  # forever
                switched_wall = time.time()
            await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    return start_wall, switched_wall, upstream_before, results


def _log_events(output: str) -> list[dict[str, Any]]:
    events = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "timestamp" in event:
                event["_t"] = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
                events.append(event)
    return events


def _errors(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(f"{r['status']} {r['error']}" for r in records if r["status"] != 200)
    return dict(sorted(counts.items()))


def summarise(
    results: list[dict[str, Any]],
    events: list[dict[str, Any]],
    *,
    start: float,
    switched: float,
    upstream_before: int,
    upstream_total: int,
    upstream_arrivals: list[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    fail_at = switched - start
    results.sort(key=lambda r: r["t"])
    ok = [r for r in results if r["status"] == 200]
    before = [r for r in results if r["t"] < fail_at]
    after = [r for r in results if r["t"] >= fail_at]
    ok_after = [r for r in after if r["status"] == 200]
    errors_after = [r for r in after if r["status"] != 200]
    last_ok = max((r["t"] for r in ok_after), default=None)
    first_error = min((r["t"] for r in errors_after), default=None)

    def rel(event: dict[str, Any]) -> float:
        return round(event["_t"] - start, 2)

    named = Counter(e["event"] for e in events)
    opened = [e for e in events if e["event"] == "upstream.breaker_opened"]
    closed = [e for e in events if e["event"] == "upstream.breaker_closed"]
    token_requests = [e for e in events if e["event"] == "upstream.token_request"]
    timeline = []
    for second in range(int(args.seconds)):
        in_second = [r for r in results if second <= r["t"] < second + 1]
        timeline.append(
            {
                "second": second,
                "requests": len(in_second),
                "ok": sum(1 for r in in_second if r["status"] == 200),
                "errors": sum(1 for r in in_second if r["status"] != 200),
                "upstream_calls": sum(1 for t in upstream_arrivals if second <= t - start < second + 1),
            }
        )
    return {
        "scenario": "outage",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "settings": {
            "seconds": args.seconds,
            "rate_per_s": args.rate,
            "token_lifetime_s": args.lifetime,
            "scope_sets": len(SCOPE_SETS),
            "broker_workers": 2,
            "upstream_fault": "503 with Retry-After: 1 on every token request",
            "upstream_fails_at_s": round(fail_at, 2),
            "broker": "defaults: deadline 10 s, max_attempts 3, breaker 5 failures / 5 s cool-down doubling to 60 s",
        },
        "requests": len(results),
        "served_200": len(ok),
        "errors_seen_by_callers": len(results) - len(ok),
        "errors_by_kind": _errors(results),
        "phases": {
            "before_failure": {"requests": len(before), "served_200": sum(r["status"] == 200 for r in before)}
            | {"errors": _errors(before)},
            "after_failure": {
                "requests": len(after),
                "served_200": len(ok_after),
                "errors": _errors(after),
                "last_200_at_s_after_failure": None if last_ok is None else round(last_ok - fail_at, 2),
                "first_error_at_s_after_failure": None if first_error is None else round(first_error - fail_at, 2),
                "distinct_tokens_served": len({r["fp"] for r in ok_after}),
            },
        },
        "latency_ms": {
            "served_200": _latency([r["latency"] for r in ok]),
            "errors": _latency([r["latency"] for r in results if r["status"] != 200]),
        },
        "upstream_calls": {
            "total": upstream_total,
            "before_failure": upstream_before,
            "after_failure": upstream_total - upstream_before,
            "broker_logged_by_status": dict(Counter(str(e.get("status")) for e in token_requests)),
        },
        "breaker": {
            "opened": len(opened),
            "closed": len(closed),
            "events": [
                {"t_s": rel(e), "event": e["event"].removeprefix("upstream."), "reason": e.get("reason")}
                | ({"cooldown_s": e["cooldown"]} if "cooldown" in e else {})
                for e in (opened + closed)
            ][:20],
            "first_opened_at_s_after_failure": round(opened[0]["_t"] - switched, 2) if opened else None,
        },
        "refresh_failures_logged": named.get("tokens.refresh_failed", 0),
        "upstream_retries_logged": named.get("upstream.retry", 0),
        "timeline": timeline,
    }


def _latency(seconds: list[float]) -> dict[str, float] | None:
    return latency_summary_ms(seconds) if seconds else None  # JSON has no NaN


def _cpus() -> int:
    return os.cpu_count() or 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    caller = Caller("outage")
    with EmbeddedRedis() as redis, AuthServerProcess() as authserver, tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), "outage.toml", broker_config(redis.url, authserver.token_url, caller))
        authserver.configure(lifetime=args.lifetime)
        with broker(config, workers=2) as proc:
            start, switched, upstream_before, results = uvloop.run(
                _load(
                    f"{proc.url}",
                    caller,
                    authserver,
                    args.seconds,
                    args.rate,
                    args.seconds * args.fail_at,
                )
            )
            stats = authserver.stats()
            output = proc.output()
        upstream_arrivals = [r["t"] for r in stats["requests"]]
        return summarise(
            results,
            _log_events(output),
            start=start,
            switched=switched,
            upstream_before=upstream_before,
            upstream_total=int(stats["token_requests"]),
            upstream_arrivals=upstream_arrivals,
            args=args,
        )


def _print(result: dict[str, Any]) -> None:
    after = result["phases"]["after_failure"]
    up = result["upstream_calls"]
    breaker = result["breaker"]
    settings = result["settings"]
    print(
        f"outage: {settings['seconds']} s at {settings['rate_per_s']}/s,"
        f" token lifetime {settings['token_lifetime_s']} s, upstream failing from {settings['upstream_fails_at_s']} s"
    )
    print(f"  requests             {result['requests']}")
    print(f"  served (200)         {result['served_200']}")
    print(f"  errors seen          {result['errors_seen_by_callers']}  {result['errors_by_kind']}")
    print(
        f"  after the failure    {after['served_200']} served,"
        f" first error +{after['first_error_at_s_after_failure']} s, last 200 +{after['last_200_at_s_after_failure']} s"
    )
    print(f"  upstream calls       {up['total']} ({up['before_failure']} before, {up['after_failure']} after)")
    print(
        f"  breaker              opened {breaker['opened']}x (first +{breaker['first_opened_at_s_after_failure']} s"
        f" after the failure), closed {breaker['closed']}x"
    )
    for kind, summary in result["latency_ms"].items():
        if summary is not None:
            p50, p99, worst = summary["p50_ms"], summary["p99_ms"], summary["max_ms"]
            print(f"  latency {kind:<12} p50 {p50} ms, p99 {p99} ms, max {worst} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run (default 60)")
    parser.add_argument("--rate", type=float, default=50.0, help="token requests per second (default 50)")
    parser.add_argument("--lifetime", type=int, default=10, help="token lifetime at the authorization server")
    parser.add_argument("--fail-at", type=float, default=0.5, help="fraction of the run when upstream fails")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    result = run(args)
    _print(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"  written              {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
