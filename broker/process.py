"""Running the broker's server process, for the commands that do (serve, dev): the config read
with one line per problem, the port checked before anything starts, uvicorn with the metrics
directory its workers share, and SIGTERM as a clean exit."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import tempfile
from typing import Any

from broker.errors import ConfigError
from broker.settings import Settings, load_settings

__all__ = ["EXIT_CONFIG", "exit_cleanly_on_sigterm", "load_or_exit", "port_problem", "run_uvicorn"]

EXIT_CONFIG = 2


def load_or_exit(path: str | None) -> Settings:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    for warning in settings.warnings:
        print(f"config warning: {warning}", file=sys.stderr)
    return settings


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def exit_cleanly_on_sigterm() -> None:
    """From here on SIGTERM is an exit that runs `finally` blocks (stopping the embedded Redis,
    removing temporary directories), like Ctrl-C. uvicorn re-raises the signal it shut down for
    once it restored this handler."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def port_problem(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on `host`:`port`, or None. Found by binding every address
    the host resolves to the way uvicorn does (SO_REUSEADDR), before anything else is started."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host} port {port}: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks: asyncio skips it too
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} on {host} is already in use"
                if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                    continue  # IPv6 disabled: asyncio skips the address as well
                return f"cannot listen on {host} port {port}: {exc.strerror}"
    return None


def run_uvicorn(host: str, port: int, workers: int) -> None:
    import uvicorn  # noqa: PLC0415 - heavy, only for serving

    # Metrics of all workers add up through files in one directory (prometheus-client's
    # multiprocess mode); it must be set before any worker imports prometheus_client.
    metrics_dir = tempfile.TemporaryDirectory(prefix="token-broker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    try:
        _uvicorn_run(uvicorn, host, port, workers)
    finally:
        metrics_dir.cleanup()


def _uvicorn_run(uvicorn: Any, host: str, port: int, workers: int) -> None:
    uvicorn.run(
        "broker.api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
