"""Shared pieces: uvicorn settings, the processes a scenario starts, configs, percentiles."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from broker.callers import hash_key, new_caller_key
from broker.embedded_redis import terminate
from broker.vault.keyring import new_key
from tests.support import CLIENT_ID, CLIENT_SECRET, REPO_ROOT, BrokerProcess, free_port, wait_http

# What broker/process.py `run_uvicorn` passes to uvicorn.run besides app, host, port and workers;
# tests/test_bench_smoke.py checks that the two stay the same.
UVICORN_SETTINGS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "lifespan": "on",
    "access_log": False,
    "log_config": None,
    "server_header": False,
    "timeout_graceful_shutdown": 10,
}

SECRET_ENV = "TB_BENCH_CLIENT_SECRET"
# `serve` refuses to start without an encryption key (spec §6.1): the bench measures it encrypted.
ENCRYPTION_KEYS = f"bench:{new_key()}"
CREDENTIAL = "bench"
# 16 allowed scopes: 65,535 distinct non-empty scope sets for the memory scenario.
SCOPES = tuple(f"urn:bench:s{i:02d}" for i in range(16))
HIT_SCOPE = "urn:bench:s00 urn:bench:s01"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p90_ms": round(percentile(seconds, 90) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "p999_ms": round(percentile(seconds, 99.9) * 1000, 3),
        "max_ms": round(max(seconds) * 1000, 3) if seconds else float("nan"),
    }


@dataclass
class Caller:
    name: str
    key: str = field(default_factory=new_caller_key)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def broker_config(
    redis_url: str,
    token_url: str,
    caller: Caller,
    *,
    extra_credentials: Sequence[str] = (),
    cache: str = "",
) -> str:
    """A broker config: credential `bench` (and `extra_credentials`) with SCOPES, all granted to caller."""
    scopes = ", ".join(f'"{s}"' for s in SCOPES)
    text = f"""
        [redis]
        url = "{redis_url}"

        [cache]
        {cache}
        """
    grants = ""
    for name in (CREDENTIAL, *extra_credentials):
        text += f"""
        [credentials.{name}]
        token_url = "{token_url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        scopes = [{scopes}]
        default_scopes = ["{SCOPES[0]}"]
        """
        grants += f"{name} = [{scopes}]\n"
    text += f"""
        [callers.{caller.name}]
        key_sha256 = "{hash_key(caller.key)}"
        [callers.{caller.name}.grants]
        """
    return textwrap.dedent(text) + grants


def write_config(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text, encoding="utf-8")
    return path


# The broker encrypts what it stores (spec §6.1), as in production; one key for the whole run.
ENCRYPTION_KEYS = os.environ.get("BROKER_ENCRYPTION_KEYS") or f"bench:{new_key()}"


@contextmanager
def broker(config: Path, workers: int, *, encrypted: bool = True) -> Iterator[BrokerProcess]:
    """A real `token-broker serve` process (tests/support.py BrokerProcess); `encrypted=False`:
    `--insecure-plaintext-cache`, to measure what encryption costs."""
    os.environ[SECRET_ENV] = CLIENT_SECRET
    env = {SECRET_ENV: CLIENT_SECRET, "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEYS if encrypted else ""}
    args = () if encrypted else ("--insecure-plaintext-cache",)
    proc = BrokerProcess(config, workers=workers, env=env, args=args)
    with proc:
        yield proc


@dataclass
class ServerProcess:
    """Any uvicorn server of ours started as `python -m MODULE ARGS --port P`."""

    module: str
    args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str) -> ServerProcess:
        fd, name = tempfile.mkstemp(prefix="tb-bench-", suffix=".log")
        self.log = Path(name)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args, "--port", str(self.port)],
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(self.url + ready_path, timeout=30, proc=self.proc, log_path=self.log)
        return self

    def stop(self) -> None:
        terminate(self.proc, timeout=15)
        self.proc = None
        if self.log is not None:
            self.log.unlink(missing_ok=True)


@contextmanager
def server(module: str, args: list[str], ready_path: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(module, args)
    try:
        yield proc.start(ready_path)
    finally:
        proc.stop()


def get_token(url: str, caller: Caller, scope: str) -> dict[str, Any]:
    response = httpx.get(url, params={"scope": scope}, headers=caller.headers, timeout=10, trust_env=False)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "python" in cmdline and "resource_tracker" not in cmdline


def worker_pids(pid: int, workers: int) -> list[int]:
    """The uvicorn worker processes of a server: itself with one worker, else its python children."""
    if workers == 1:
        return [pid]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [c for c in children(pid) if _is_worker(c)]
        if len(found) >= workers:
            return found
        time.sleep(0.1)
    raise RuntimeError(f"expected {workers} workers under pid {pid}")
