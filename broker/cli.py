"""The `token-broker` command: serve, dev, check-config, caller-key, encryption-key, rotate-key, token.

Entry points only: the server process is broker/process.py, the demo broker/dev.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from broker.callers import hash_key, new_caller_key
from broker.dev import cmd_dev
from broker.embedded_redis import EmbeddedRedis, RedisServerNotFound
from broker.errors import UpstreamError
from broker.logs import configure_logging
from broker.process import EXIT_CONFIG, exit_cleanly_on_sigterm, load_or_exit, port_problem, run_uvicorn
from broker.settings import Settings
from broker.vault.keyring import new_key

__all__ = ["main"]

_NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
log = structlog.get_logger("broker.cli")


def _serve(settings: Settings, config_path: str, host: str, port: int, workers: int) -> int:
    """Run the broker; with no Redis URL, around an embedded redis-server that stops with us."""
    if (problem := port_problem(host, port)) is not None:
        print(f"error: {problem}: choose another with --port N, [server] port or BROKER_SERVER_PORT", file=sys.stderr)
        return 1
    exit_cleanly_on_sigterm()
    os.environ["BROKER_CONFIG"] = str(Path(config_path).resolve())
    embedded: EmbeddedRedis | None = None
    if settings.redis.url is None:
        try:
            embedded = EmbeddedRedis().start()
        except (RedisServerNotFound, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        os.environ["BROKER_REDIS_URL"] = embedded.url
        log.info("redis.embedded_started", url=embedded.url)
    try:
        run_uvicorn(host, port, workers)
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("redis.embedded_stopped")
    return 0


_NO_KEY = (
    "config error: vault.encryption_keys: no encryption key: set BROKER_ENCRYPTION_KEYS or [vault]"
    " encryption_keys_file (`token-broker encryption-key` prints one), or start with --insecure-plaintext-cache"
)


def cmd_serve(args: argparse.Namespace) -> int:
    configure_logging()
    settings = load_or_exit(args.config)
    if settings.keyring is None:
        if not args.insecure_plaintext_cache:
            print(_NO_KEY, file=sys.stderr)
            return EXIT_CONFIG
        print(
            "config warning: tokens, refusals, users' refresh tokens and the admin API's entries (their secrets"
            " included) are stored in Redis in plaintext",
            file=sys.stderr,
        )
    return _serve(
        settings,
        args.config or os.environ["BROKER_CONFIG"],
        args.host or settings.server.host,
        args.port if args.port is not None else settings.server.port,
        args.workers or settings.server.workers,
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_or_exit(args.config)
    print(f"config OK: {len(settings.credentials)} credential(s), {len(settings.callers)} caller(s)")
    if args.probe:
        return asyncio.run(_probe(settings))
    return 0


async def _probe(settings: Settings) -> int:
    """Fetch one token per credential (its default scopes) and say what happened."""
    from broker.upstream.client import UpstreamClient  # noqa: PLC0415
    from broker.upstream.exchange import new_http_client  # noqa: PLC0415

    failed = 0
    async with new_http_client(settings.upstream) as http:
        client = UpstreamClient(http, settings.upstream, default_expires_in=settings.cache.default_expires_in)
        for credential in settings.credentials.values():
            if not credential.default_scopes:
                # a request naming no scope is refused (spec §4.8): there is nothing to probe with
                print(f"probe {credential.name}: skipped, no default_scopes to ask for")
                continue
            scope_set = " ".join(credential.default_scopes)
            try:
                token = await client.fetch(credential, scope_set, time.monotonic() + 10)
            except UpstreamError as exc:
                failed += 1
                print(f"probe {credential.name}: FAILED {exc.code}: {exc.description}")
            else:
                print(f"probe {credential.name}: ok, scope {token.scope!r}, lifetime {int(token.lifetime)} s")
        await client.aclose()
    return 1 if failed else 0


def cmd_caller_key(args: argparse.Namespace) -> int:
    what, section = ("admin", "admins") if args.admin else ("caller", "callers")
    if not _NAME.fullmatch(args.name):
        print(
            f"error: a{'n' if args.admin else ''} {what} name is 1-64 letters, digits, '.', '_' or '-'", file=sys.stderr
        )
        return EXIT_CONFIG
    key = new_caller_key()
    holder = "the operator's password manager" if args.admin else "the caller's secret store"
    print(f"# {what.capitalize()} key for {args.name}. It is shown once: hand it to {holder}.")
    print(key)
    print("# Add to the broker config (only the hash is stored):")
    print(f"[{section}.{args.name}]")
    print(f'key_sha256 = "{hash_key(key)}"')
    return 0


def cmd_encryption_key(args: argparse.Namespace) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,32}", args.kid):
        print("error: a key id is 1-32 letters, digits, '_' or '-'", file=sys.stderr)
        return EXIT_CONFIG
    print(
        "# A new AES-256 key. Put it first in BROKER_ENCRYPTION_KEYS (or the keys file) to encrypt with it;"
        " keep the old ones after it until `token-broker rotate-key` has run.",
        file=sys.stderr,
    )
    print(f"{args.kid}:{new_key()}")
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Re-seal everything stored under the first key, so the others can be dropped (spec §6.1)."""
    settings = load_or_exit(args.config)
    if settings.keyring is None:
        print(_NO_KEY.replace(", or start with --insecure-plaintext-cache", ""), file=sys.stderr)
        return EXIT_CONFIG
    if settings.redis.url is None:
        print("error: rotate-key needs [redis] url (an embedded Redis keeps nothing)", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(_rotate(settings))


async def _rotate(settings: Settings) -> int:
    from broker.entries import Codec  # noqa: PLC0415
    from broker.errors import StoreUnavailable  # noqa: PLC0415
    from broker.store import Store, connect  # noqa: PLC0415

    assert settings.redis.url is not None  # noqa: S101 - checked by the caller
    redis = connect(
        settings.redis.url,
        tls_ca_file=settings.redis.tls_ca_file,
        tls_cert_file=settings.redis.tls_cert_file,
        tls_key_file=settings.redis.tls_key_file,
    )
    try:
        store = Store(redis, prefix=settings.redis.key_prefix, codec=Codec(settings.keyring))
        rewrapped, seen = await store.rewrap_all()
    except StoreUnavailable as exc:
        print(f"error: {exc.description}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    primary = settings.keyring.primary if settings.keyring else "-"
    print(f"rotate-key: {rewrapped} of {seen} stored value(s) re-sealed under key {primary!r}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token of the broker (through the SDK, the one client): exit 0, 1 refused, 2 usage."""
    from broker.client import CALLER_KEY_ENV, BrokerAuth, BrokerClientError  # noqa: PLC0415

    if args.caller_key_argument is not None:
        # Never echoed: it is a secret, already exposed to ps and the shell history.
        print(
            f"error: the caller key is never taken from an argument, where ps and shell history show it:"
            f" put it in the environment variable {CALLER_KEY_ENV} (or name another with --caller-key-env)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    env = args.caller_key_env or CALLER_KEY_ENV
    if not _ENV_NAME.fullmatch(env) or env.startswith("tbk_"):  # a key where its variable's name belongs
        print("error: --caller-key-env takes the name of an environment variable, not its value", file=sys.stderr)
        return EXIT_CONFIG
    key = os.environ.get(env, "")
    if not key:
        print(
            f"error: no caller key: set the environment variable {env} (or name another with --caller-key-env)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        auth = BrokerAuth(args.credential, args.scope, url=args.url, caller_key=key, min_ttl=args.min_ttl)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with auth:
        try:
            token = auth.token()
        except BrokerClientError as exc:
            print(f"error: {exc.error_description} ({exc.error})", file=sys.stderr)
            return 1
    print(token.answer if args.json else token.access_token)
    return 0


def _seconds(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise argparse.ArgumentTypeError("must be a non-negative integer number of seconds")
    return int(raw)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="token-broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config", help="config file (default: $BROKER_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="uvicorn worker processes sharing one Redis")
    serve.add_argument(
        "--insecure-plaintext-cache",
        action="store_true",
        help="start without an encryption key: everything the broker stores in Redis is in plaintext",
    )
    serve.set_defaults(func=cmd_serve)

    rotate = sub.add_parser("rotate-key", help="re-seal everything stored in Redis under the first encryption key")
    rotate.add_argument("--config", help="config file (default: $BROKER_CONFIG)")
    rotate.set_defaults(func=cmd_rotate_key)

    enc = sub.add_parser("encryption-key", help="print a new encryption key (kid:base64)")
    enc.add_argument("kid", nargs="?", default="k1", help="its key id (default k1)")
    enc.set_defaults(func=cmd_encryption_key)

    dev = sub.add_parser("dev", help="run a demo: embedded Redis, demo authorization server, demo caller")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--workers", type=int, default=1)
    dev.set_defaults(func=cmd_dev)

    check = sub.add_parser("check-config", help="validate a config file (exit 0 or 2)")
    check.add_argument("--config", help="config file (default: $BROKER_CONFIG)")
    check.add_argument("--probe", action="store_true", help="also fetch one token per credential")
    check.set_defaults(func=cmd_check_config)

    key = sub.add_parser("caller-key", help="print a new caller key (or admin key) and its config lines")
    key.add_argument("name")
    key.add_argument("--admin", action="store_true", help="a key for the admin API: [admins.NAME]")
    key.set_defaults(func=cmd_caller_key)

    token = sub.add_parser(
        "token",
        help='print a token of the broker (for scripts: curl -H "Authorization: Bearer $(token-broker token NAME)")',
        description="Print an access token of CREDENTIAL from the broker. The caller key comes from an "
        "environment variable, never from an argument. Exit 0, 1 when the broker refuses or cannot be reached,"
        " 2 on usage errors.",
        allow_abbrev=False,  # `--caller-key X` must not pass for `--caller-key-env X`
    )
    token.add_argument("credential")
    token.add_argument("--scope", help="space-separated scopes (default: the credential's default scopes)")
    token.add_argument("--min-ttl", type=_seconds, default=0, metavar="N", help="seconds the token must have left")
    token.add_argument("--url", help="the broker (default: $TOKEN_BROKER_URL, else http://127.0.0.1:8080)")
    token.add_argument("--json", action="store_true", help="print the broker's JSON answer as it is")
    token.add_argument(
        "--caller-key-env",
        metavar="VAR",
        help="environment variable holding the caller key (default: TOKEN_BROKER_CALLER_KEY)",
    )
    token.add_argument("--caller-key", dest="caller_key_argument", help=argparse.SUPPRESS)  # refused, never echoed
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result
