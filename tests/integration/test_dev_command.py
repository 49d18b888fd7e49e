"""`token-broker dev` as a user runs it: banner, a working curl line, a clean stop."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.workers import descendants
from tests.support import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

_CURL = re.compile(r"curl -s -H 'Authorization: Bearer (?P<key>[^']+)' '(?P<url>http://[^']+)'")
_REDIS = re.compile(r"embedded redis\s+redis://127\.0\.0\.1:(?P<port>\d+)/")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_redis_server(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _read_until(lines: queue.Queue[str | None], pattern: re.Pattern[str], timeout: float) -> tuple[str, re.Match[str]]:
    """Everything printed so far and the first match of `pattern`, or fail with the output."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if match := pattern.search(line):
            return "".join(seen), match
    raise AssertionError(f"no {pattern.pattern!r} in the output:\n{''.join(seen)}")


def test_dev_serves_the_printed_curl_line_and_stops_its_redis_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    stderr_path = Path(tempfile.mkstemp(prefix="tb-dev-", suffix=".log", dir=tmp_path)[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev", "--port", str(port)],
            cwd=REPO_ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    redis_port: int | None = None
    redis_pids: list[int] = []
    try:
        banner, curl = _read_until(lines, _CURL, timeout=30)
        redis_match = _REDIS.search(banner)
        assert redis_match, banner
        redis_port = int(redis_match["port"])
        assert curl["url"].startswith(f"http://127.0.0.1:{port}/v1/tokens/demo?scope=")

        deadline = time.monotonic() + 20
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                assert proc.poll() is None, stderr_path.read_text(errors="replace")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                assert time.monotonic() < deadline, "dev broker not ready: " + stderr_path.read_text(errors="replace")
                time.sleep(0.1)
            response = client.get(curl["url"], headers={"Authorization": f"Bearer {curl['key']}"})
        assert response.status_code == 200, response.text
        body = response.json()
        header, payload, signature = body["access_token"].split(".")
        assert signature
        assert json.loads(base64.urlsafe_b64decode(header + "==="))["alg"] == "RS256"
        assert json.loads(base64.urlsafe_b64decode(payload + "==="))["scope"] == "urn:demo:claims.read"
        assert body["scope"] == "urn:demo:claims.read"
        assert body["expires_in"] > 0
        assert _accepts(redis_port)

        redis_pids = [pid for pid in descendants(proc.pid) if _is_redis_server(pid)]
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("token-broker dev did not exit within 15 s of SIGTERM")
        print(f"\ntoken-broker dev: exit status {code} after SIGTERM")
        assert not _accepts(redis_port), f"the embedded redis-server outlived `token-broker dev` (exit {code})"
        assert not _accepts(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        # A leaked redis-server runs in its own session: end exactly the processes this test started.
        for pid in redis_pids:
            if _is_redis_server(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
