"""Hit throughput with a caller JWT (issue 13): target 1's L1 hit, 1 worker, the caller sending a
JWT from a trusted issuer (tests/callerissuer.py, RS256) instead of a caller key.

A token presented again costs one SHA-256 (verified tokens are remembered until their `exp`),
and the fast path answers it, so the target is a key caller's stretch: broker/baseline ≥ 1.0.
One broker serves both callers; baseline, key caller and JWT caller alternate, so the key
caller's figure from the same run tells what the JWT itself costs.
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
from tests.callerissuer import AUDIENCE, CallerIssuerProcess, Signer

TARGET = 1.0
SUBJECT = "system:serviceaccount:bench:jwt"


def config(base: str, issuer: str) -> str:
    """`base` (a broker config, bench/common.py) plus a trusted issuer and a caller known by its JWTs."""
    scopes = ", ".join(f'"{s}"' for s in SCOPES)
    return base + textwrap.dedent(
        f"""
        [caller_issuers.bench]
        issuer = "{issuer}"
        jwks_uri = "{issuer}/jwks"
        audience = "{AUDIENCE}"

        [callers.bench-jwt]
        jwt_subjects = ["{SUBJECT}"]
        [callers.bench-jwt.grants]
        {CREDENTIAL} = [{scopes}]
        """
    )


def _kubernetes_claims(signer: Signer) -> dict[str, Any]:
    """What a projected service-account token carries besides iss/sub/aud (about 1 KiB in all)."""
    now = signer.claims(SUBJECT)["iat"]
    pod = {"name": "bench-7d9f8b6c4-x2x9q", "uid": "5e0c7a8e-2b1f-4d3a-9c7e-0f6d2a1b3c4d"}
    account = {"name": "jwt", "uid": "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"}
    return {
        "exp": now + 3600,
        "jti": "0b8f5c1e-3d2a-4f6b-9e7c-1a2b3c4d5e6f",
        "kubernetes.io": {
            "namespace": "bench",
            "node": {"name": "node-1", "uid": pod["uid"]},
            "pod": pod,
            "serviceaccount": account,
            "warnafter": now + 3000,
        },
    }


def run(write: Any, base: str, key_caller: Caller, rounds: int, settings: WrkSettings) -> dict[str, Any]:
    """`write(name, text)` → path of a config file; `base` is the key caller's config text."""
    with CallerIssuerProcess() as issuers:
        signer = Signer(issuers.issuer("bench"))
        issuers.publish("bench", signer)
        jwt_caller = Caller("bench-jwt", key=signer.token(SUBJECT, **_kubernetes_claims(signer)))
        path: Path = write("broker-jwt.toml", config(base, signer.issuer))
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "key": [], "jwt": []}
        with broker(path, 1) as proc:
            token = get_token(f"{proc.url}/v1/tokens/{CREDENTIAL}", key_caller, HIT_SCOPE)
            get_token(f"{proc.url}/v1/tokens/{CREDENTIAL}", jwt_caller, HIT_SCOPE)
            common = ["--workers", "1", "--body-bytes", str(_body_bytes(token))]
            with server("bench.baseline", common, BASELINE_PATH) as base_server:
                for _ in range(rounds):
                    runs["baseline"].append(wrk.measure(base_server.url + BASELINE_PATH, {}, settings))
                    runs["key"].append(wrk.measure(hit_url(proc.url), key_caller.headers, settings))
                    runs["jwt"].append(wrk.measure(hit_url(proc.url), jwt_caller.headers, settings))
        key_set_requests = issuers.stats("bench")["jwks"]
    base_rps = [r["rps"] for r in runs["baseline"]]
    result: dict[str, Any] = {"workers": 1, "baseline_rps": base_rps, "token_bytes": len(jwt_caller.key)}
    for name in ("key", "jwt"):
        rps = [r["rps"] for r in runs[name]]
        result[f"{name}_rps"] = rps
        result[f"{name}_ratio"] = round(median([b / a for a, b in zip(base_rps, rps, strict=True)]), 3)
        result[f"{name}_p99_ms"] = round(median([r["latency_ms"]["p99"] for r in runs[name]]), 3)
    result["jwt_vs_key"] = round(median(result["jwt_rps"]) / median(result["key_rps"]), 3)
    result["key_set_requests"] = key_set_requests
    result["errors"] = sum(r["non_2xx_or_errors"] for rs in runs.values() for r in rs)
    result["target"] = TARGET
    result["pass"] = result["jwt_ratio"] >= TARGET and result["errors"] == 0
    return result
