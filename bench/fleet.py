"""Target 4: fleet economy. K client processes each need a token every second for 3 token
lifetimes; count the token requests the authorization server sees.

- broker: every process asks one broker (`token-broker serve`, 2 workers): the fleet shares one
  token, refreshed ahead of expiry through single-flight.
- library: every process holds the client secret and runs authlib's client credentials flow
  with its own token cache, the usual per-process setup.

For a like-for-like comparison the library's `leeway` (how early it replaces a token) is the
broker's effective skew, min(skew_seconds, lifetime/4): neither side uses a token closer to
its expiry than that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import CREDENTIAL, Caller, broker
from tests.support import CLIENT_ID, CLIENT_SECRET, REPO_ROOT, AuthServerProcess

FLEET_SCOPE = "urn:bench:s02"


def _run_fleet(commands: list[list[str]], interval: float) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.fleet_client", *cmd, "--phase", f"{interval * i / len(commands):.3f}"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, cmd in enumerate(commands)
    ]
    try:
        for proc in procs:  # every process has imported what it needs before the clock starts
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a fleet client did not start")
        start = time.time() + 0.5
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _summary(upstream: int, results: list[dict[str, Any]], lifetimes: int) -> dict[str, Any]:
    return {
        "upstream_requests": upstream,
        "upstream_per_lifetime": round(upstream / lifetimes, 2),
        "uses": sum(r["uses"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "max_client_late_s": round(max(r["max_late_s"] for r in results), 3),
    }


def run(
    config: Path,
    caller: Caller,
    authserver: AuthServerProcess,
    *,
    clients: int,
    lifetime: int,
    lifetimes: int,
    skew_seconds: float = 30.0,
) -> dict[str, Any]:
    interval = 1.0
    count = round(lifetime * lifetimes / interval)
    leeway = int(min(skew_seconds, lifetime / 4))
    result: dict[str, Any] = {
        "clients": clients,
        "token_lifetime_s": lifetime,
        "lifetimes": lifetimes,
        "interval_s": interval,
        "library": "authlib httpx OAuth2Client (client_credentials)",
        "library_leeway_s": leeway,
    }
    with broker(config, 2) as proc:
        authserver.reset()
        authserver.configure(lifetime=lifetime)
        url = f"{proc.url}/v1/tokens/{CREDENTIAL}"
        cmd = ["--mode", "broker", "--url", url, "--key", caller.key, "--scope", FLEET_SCOPE, "--count", str(count)]
        results = _run_fleet([cmd] * clients, interval)
        result["broker"] = _summary(authserver.token_requests(), results, lifetimes)
    authserver.reset()
    authserver.configure(lifetime=lifetime)
    cmd = [
        "--mode",
        "library",
        "--token-url",
        authserver.token_url,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
        "--scope",
        FLEET_SCOPE,
        "--leeway",
        str(leeway),
        "--count",
        str(count),
    ]
    results = _run_fleet([cmd] * clients, interval)
    result["per_process_library"] = _summary(authserver.token_requests(), results, lifetimes)
    authserver.reset()
    broker_rate = result["broker"]["upstream_per_lifetime"]
    result["ratio_library_to_broker"] = round(
        result["per_process_library"]["upstream_requests"] / max(1, result["broker"]["upstream_requests"]), 1
    )
    # "about one per lifetime": refresh-ahead replaces the token at 60-80% of its cached window,
    # so a little under 2 per lifetime at most, whatever the number of clients.
    result["pass"] = broker_rate <= 2.5 and result["broker"]["errors"] == 0
    return result
