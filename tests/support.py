"""Helpers for fixtures: free ports, readiness polling, and the test authorization server process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import httpx
import redis

from broker.embedded_redis import terminate
from broker.entries import CachedToken, Codec
from broker.settings import Settings, load_settings
from broker.store import Keys, TokenKeys
from broker.vault.keyring import KeyRing
from tests.authserver import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLIENTS,
    WEIRD_CLIENT_ID,
    WEIRD_CLIENT_SECRET,
)

__all__ = [
    "CLIENTS",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "REPO_ROOT",
    "WEIRD_CLIENT_ID",
    "WEIRD_CLIENT_SECRET",
    "AuthServerProcess",
    "BrokerProcess",
    "descendants",
    "free_port",
    "kill_tree",
    "stored_token",
    "token_keys",
    "wait_http",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def token_keys(config: Path | Settings, credential: str, scope_set: str) -> TokenKeys:
    """The Redis keys a broker with this config uses for (credential, scope set)."""
    settings = config if isinstance(config, Settings) else load_settings(config)
    shape = settings.credentials[credential].shape
    return Keys(settings.redis.key_prefix).for_token(credential, shape, scope_set)


def stored_token(redis_url: str, keys: TokenKeys) -> CachedToken | None:
    """The token stored under `keys`, read as a broker with the suite's encryption keys would
    (value and PTTL), or None."""
    with redis.Redis.from_url(redis_url) as client:
        read_at = time.monotonic()
        with client.pipeline(transaction=True) as pipe:
            raw, pttl, (seconds, micros) = pipe.get(keys.token).pttl(keys.token).time().execute()
    codec = Codec(KeyRing.parse(os.environ["BROKER_ENCRYPTION_KEYS"]))
    redis_now_ms = seconds * 1000 + micros // 1000
    return codec.decode_token(raw, keys.token, int(pttl), read_at, redis_now_ms) if raw else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _process_output(proc: subprocess.Popen[Any] | None, log_path: Path | None) -> str:
    if log_path is not None and log_path.exists():
        return log_path.read_text(errors="replace")
    if proc is not None and proc.stdout is not None and proc.poll() is not None:
        out = proc.stdout.read()
        return out.decode(errors="replace") if isinstance(out, bytes) else str(out)
    return ""


def wait_http(
    url: str,
    timeout: float = 15.0,
    proc: subprocess.Popen[Any] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll until GET url answers below 500; fail early, with its output, if proc exits."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"process {proc.args!r} exited with {proc.returncode} before {url} answered;"
                    f" output:\n{_process_output(proc, log_path)}"
                )
            try:
                status = client.get(url).status_code
                if status < 500:
                    return
                last = f"HTTP {status}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{url} not ready after {timeout:g}s (last: {last}); output:\n{_process_output(proc, log_path)}"
                )
            time.sleep(0.05)


class AuthServerProcess:
    """tests/authserver.py in a child process. ``url`` is the issuer, final once started."""

    def __init__(self, port: int | None = None) -> None:
        self._fixed_port = port is not None
        self._set_port(port if port is not None else free_port())
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    def _set_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token_url = f"{self.url}/oauth/token"

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("authorization server already started")
        # A chosen-then-released port can be taken before the child binds it; retry on a new one.
        for attempt in range(3):
            try:
                self._spawn()
            except BaseException as exc:
                self.stop()
                if self._fixed_port or attempt == 2 or not isinstance(exc, RuntimeError):
                    raise
                self._set_port(free_port())
            else:
                break
        self._client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)
        return self

    def _spawn(self) -> None:
        fd, name = tempfile.mkstemp(prefix="authserver-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.authserver", "--port", str(self.port)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_http(f"{self.url}/_control/health", proc=self._proc, log_path=self.log_path)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        terminate(self._proc)
        self._proc = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _http(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("authorization server not started")
        return self._client

    def output(self) -> str:
        """What the server process printed so far (uvicorn warnings and errors)."""
        return _process_output(self._proc, self.log_path)

    def configure(self, **config: Any) -> dict[str, Any]:
        """Change settings (see tests/authserver.py Config); returns the resulting config."""
        response = self._http().post("/_control/config", json=config)
        if response.status_code != 200:
            raise ValueError(f"authserver rejected config {config!r}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def stats(self) -> dict[str, Any]:
        response = self._http().get("/_control/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def token_requests(self) -> int:
        return int(self.stats()["token_requests"])

    def reset(self) -> None:
        self._http().post("/_control/reset").raise_for_status()


class BrokerProcess:
    """A real `token-broker serve` process (uvicorn, N workers) on a free port. `cwd` is where
    `python -m broker` finds the package: another tree (an older release) runs that tree's code.

    Every instance is in `BrokerProcess.instances`, and what it logged can be read piece by piece
    (`unread_output`): the suite's leak watch (tests/leakwatch.py) reads every line once, and
    `discard_log` hands it what is left before the file goes."""

    instances: ClassVar[weakref.WeakSet[BrokerProcess]] = weakref.WeakSet()
    on_discard: ClassVar[Callable[[BrokerProcess, str], None] | None] = None

    def __init__(
        self, config: Path, *, workers: int = 1, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
    ) -> None:
        self.config = config
        self.workers = workers
        self.env = env or {}
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="tb-broker-", suffix=".log")[1])
        self._read_up_to = 0
        BrokerProcess.instances.add(self)

    def start(self, timeout: float = 30.0) -> Self:
        cmd = [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        env = {**os.environ, **self.env}
        with self.log_path.open("ab") as out:  # a restarted broker's log follows its earlier one
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # every worker must be up: /readyz answers 200 only after a worker saw Redis
        wait_http(f"{self.url}/readyz", timeout=timeout, proc=self.proc, log_path=self.log_path)
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"broker not ready: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def unread_output(self, *, partial: bool = False) -> str:
        """What the broker logged since the last call (whole lines only, unless `partial`)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._read_up_to)
                data = log.read()
        except OSError:
            return ""
        if not partial:
            data = data[: data.rfind(b"\n") + 1]
        self._read_up_to += len(data)
        return data.decode(errors="replace")

    def discard_log(self) -> None:
        if BrokerProcess.on_discard is not None:
            BrokerProcess.on_discard(self, self.unread_output(partial=True))
        self.log_path.unlink(missing_ok=True)

    def stop(self) -> None:
        terminate(self.proc, timeout=15)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.discard_log()


_PROC = Path("/proc")


def descendants(root: int) -> list[int]:
    """Every live process below `root` (uvicorn's workers, multiprocessing helpers)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(broker: BrokerProcess, sig: signal.Signals) -> list[int]:
    """Send `sig` to a broker's uvicorn process and every process below it (its workers).

    BrokerProcess does not start a session of its own, so its process group is the test
    runner's: a killpg would hit pytest. Returns the pids signalled.
    """
    assert broker.proc is not None, "broker not started"
    pids = [*descendants(broker.proc.pid), broker.proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids
