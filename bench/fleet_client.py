"""One process of the simulated fleet: needs a token every `interval` seconds, `count` times.

`--mode broker`: asks the broker (GET /v1/tokens/...), as a service using token-broker does.
`--mode library`: holds its own client secret and uses authlib's httpx OAuth2Client with the
client credentials grant, which fetches a token when it has none or the one it has expires
within `leeway` seconds; each use is a request to the authorization server's health endpoint
carrying the token (authlib attaches it, refreshing first if needed).

Prints "ready", waits for a start time (epoch seconds) on stdin, then prints one JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx


def _broker_mode(args: argparse.Namespace) -> Any:
    client = httpx.Client(timeout=10, trust_env=False, headers={"Authorization": f"Bearer {args.key}"})

    def need_token() -> str:
        response = client.get(args.url, params={"scope": args.scope})
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    return need_token


def _library_mode(args: argparse.Namespace) -> Any:
    from authlib.integrations.httpx_client import OAuth2Client

    client = OAuth2Client(
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_endpoint=args.token_url,
        grant_type="client_credentials",
        scope=args.scope,
        leeway=args.leeway,
        timeout=10,
        trust_env=False,
    )
    resource = args.token_url.rsplit("/oauth/", 1)[0] + "/_control/health"

    def need_token() -> str:
        if client.token is None:
            client.fetch_token()
        client.get(resource).raise_for_status()  # refreshes first if the token is about to expire
        token: str = client.token["access_token"]
        return token

    return need_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["broker", "library"], required=True)
    parser.add_argument("--url", help="broker token URL (broker mode)")
    parser.add_argument("--key", help="caller key (broker mode)")
    parser.add_argument("--token-url", help="token endpoint (library mode)")
    parser.add_argument("--client-id")
    parser.add_argument("--client-secret")
    parser.add_argument("--scope", required=True)
    parser.add_argument("--leeway", type=int, default=0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--phase", type=float, default=0.0, help="offset of this process's schedule (seconds)")
    args = parser.parse_args()
    need_token = _broker_mode(args) if args.mode == "broker" else _library_mode(args)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    tokens: set[str] = set()
    errors = 0
    late = 0.0
    for i in range(args.count):
        due = start + args.phase + i * args.interval
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        late = max(late, -delay)
        try:
            tokens.add(need_token())
        except Exception:  # a failed use is counted, the schedule goes on
            errors += 1
    print(json.dumps({"uses": args.count, "errors": errors, "distinct_tokens": len(tokens), "max_late_s": late}))


if __name__ == "__main__":
    main()
