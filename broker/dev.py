"""`token-broker dev`: the demo. An embedded Redis, the demo authorization server (a client, a
user who logs in), a caller with a fresh key, the OAuth facade on, and the curl lines to try it;
everything it made goes away when it stops."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

from broker.callers import hash_key, new_caller_key
from broker.embedded_redis import EmbeddedRedis, RedisServerNotFound, free_port
from broker.logs import configure_logging
from broker.process import exit_cleanly_on_sigterm, load_or_exit, port_problem, run_uvicorn
from broker.vault.keyring import new_key

__all__ = ["cmd_dev"]

_DEV_CONFIG = """\
# Written by `token-broker dev`: one demo credential, one demo caller.
[server]
port = {port}
public_url = "http://127.0.0.1:{port}"   # turns on the OAuth facade at /oauth2/demo

[redis]
url = "{redis_url}"

[credentials.demo]
issuer = "{issuer}"
client_id = "demo-client"
client_secret = {{ env = "TB_DEMO_CLIENT_SECRET" }}
scopes = ["urn:demo:claims.read", "urn:demo:claims.write"]
default_scopes = ["urn:demo:claims.read"]

# Users log in to this one (authorization code grant with OpenID Connect, spec §5).
[credentials.demo-users]
issuer = "{issuer}"
client_id = "demo-client"
client_secret = {{ env = "TB_DEMO_CLIENT_SECRET" }}
grant = "authorization_code"
scopes = ["urn:demo:claims.read"]
default_scopes = ["urn:demo:claims.read"]
return_to_allow = ["http://127.0.0.1:{port}/"]

[callers.demo-caller]
key_sha256 = "{key_hash}"
[callers.demo-caller.grants]
demo = ["urn:demo:claims.read", "urn:demo:claims.write"]
demo-users = ["urn:demo:claims.read"]
"""


def _start_demo_authserver(client_secret: str, broker_base: str) -> str:
    import uvicorn  # noqa: PLC0415

    from broker.demo import create_demo_authserver  # noqa: PLC0415
    from broker.logins import CALLBACK_PATH  # noqa: PLC0415

    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    app = create_demo_authserver(issuer, client_secret, redirect_uris=[f"{broker_base}{CALLBACK_PATH}"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, name="demo-authserver", daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the demo authorization server did not start")
        time.sleep(0.02)
    return issuer


def cmd_dev(args: argparse.Namespace) -> int:
    if (problem := port_problem("127.0.0.1", args.port)) is not None:
        print(
            f"error: {problem}: choose another with `token-broker dev --port N` (or `make demo PORT=N`)",
            file=sys.stderr,
        )
        return 1
    exit_cleanly_on_sigterm()
    configure_logging()
    client_secret = secrets.token_urlsafe(24)
    os.environ["TB_DEMO_CLIENT_SECRET"] = client_secret
    # An ephemeral key: the demo's Redis goes away with it, and so does everything sealed with it.
    os.environ.setdefault("BROKER_ENCRYPTION_KEYS", f"dev:{new_key()}")
    # Every exit (stop, SIGTERM, Ctrl-C, a failure to start) stops the Redis and removes the directory.
    with contextlib.ExitStack() as cleanup:
        try:
            embedded = cleanup.enter_context(EmbeddedRedis())
            issuer = _start_demo_authserver(client_secret, f"http://127.0.0.1:{args.port}")
        except (RedisServerNotFound, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        key = new_caller_key()
        workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="token-broker-dev-")))
        config = workdir / "dev.toml"
        config.write_text(
            _DEV_CONFIG.format(port=args.port, redis_url=embedded.url, issuer=issuer, key_hash=hash_key(key)),
            encoding="utf-8",
        )
        load_or_exit(str(config))
        base = f"http://127.0.0.1:{args.port}"
        from broker import demo  # noqa: PLC0415

        print(
            f"""
token-broker dev
  broker                 {base}
  demo authorization     {issuer}   (client demo-client, RS256 JWTs, /jwks)
  embedded redis         {embedded.url}
  config                 {config}
  caller key             {key}   (caller demo-caller)
  OAuth facade issuer    {base}/oauth2/demo   (client_id demo-caller, client_secret the caller key)

Get a token:
  curl -s -H 'Authorization: Bearer {key}' '{base}/v1/tokens/demo?scope=urn:demo:claims.read'
Or as an OAuth client would (RFC 6749 client credentials grant):
  curl -s -u 'demo-caller:{key}' -d grant_type=client_credentials '{base}/oauth2/demo/token'
A user's token (authorization code grant; demo user {demo.DEMO_USER} / {demo.DEMO_PASSWORD}):
  curl -s -X POST -H 'Authorization: Bearer {key}' -d '{{}}' '{base}/v1/authorizations/demo-users'
  # open its authorize_url in a browser, sign in; the page names the subject, then:
  curl -s -H 'Authorization: Bearer {key}' '{base}/v1/tokens/demo-users/subjects/{demo.DEMO_SUBJECT}'
""",
            flush=True,
        )
        os.environ["BROKER_CONFIG"] = str(config)
        run_uvicorn("127.0.0.1", args.port, args.workers)
    return 0
