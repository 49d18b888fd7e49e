"""`token-broker dev` as a user runs it: banner, a working curl line, a clean stop.

Each run gets a private TMPDIR, so that what `dev` leaves behind there can be seen."""

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


def _env(tmpdir: Path, **extra: str) -> dict[str, str]:
    """The user's environment without BROKER_* settings, with a private (empty) TMPDIR."""
    tmpdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**env, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir), **extra}


def _left_in(tmpdir: Path) -> list[str]:
    return sorted(path.name for path in tmpdir.iterdir())


def _redis_servers_using(tmpdir: Path) -> list[int]:
    """Live redis-server processes whose command line names `tmpdir` (their --dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_redis_server(int(entry.name)):
            with contextlib.suppress(OSError):
                if str(tmpdir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dev_serves_the_printed_curl_line_and_cleans_up_on_stop(tmp_path: Path, stop: signal.Signals) -> None:
    """Stopped by SIGTERM or Ctrl-C (SIGINT), `dev` leaves no redis-server and nothing in TMPDIR:
    it used to leave its `token-broker-dev-*` directory (the config file) behind on every run."""
    port = free_port()
    private_tmp = tmp_path / "tmp"
    stderr_path = Path(tempfile.mkstemp(prefix="tb-dev-", suffix=".log", dir=tmp_path)[1])
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev", "--port", str(port)],
            cwd=REPO_ROOT,
            env=_env(private_tmp),
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
        # the OAuth facade is on, at the issuer the banner shows
        issuer = f"http://127.0.0.1:{port}/oauth2/demo"
        assert f"OAuth facade issuer    {issuer}   (client_id demo-caller" in banner
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            discovered = client.get(f"{issuer}/.well-known/openid-configuration").json()
            facade = client.post(
                discovered["token_endpoint"],
                auth=("demo-caller", curl["key"]),
                data={"grant_type": "client_credentials"},
            )
        assert discovered["issuer"] == issuer
        assert facade.status_code == 200, facade.text
        assert facade.json()["access_token"] == body["access_token"]
        assert _accepts(redis_port)

        redis_pids = [pid for pid in descendants(proc.pid) if _is_redis_server(pid)]
        assert _left_in(private_tmp), "dev runs with its files in TMPDIR"
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"token-broker dev did not exit within 15 s of {stop.name}")
        print(f"\ntoken-broker dev: exit status {code} after {stop.name}")
        assert not _accepts(redis_port), f"the embedded redis-server outlived `token-broker dev` (exit {code})"
        assert not _accepts(port)
        assert _left_in(private_tmp) == [], f"left behind in TMPDIR after {stop.name}"
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


def test_dev_on_a_taken_port_says_so_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    """A taken port used to print the banner and curl line first, then uvicorn's bind error, with
    an embedded Redis and a demo server started for nothing: now one line, before anything starts."""
    private_tmp = tmp_path / "tmp"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "broker", "dev", "--port", str(port)],
            cwd=REPO_ROOT,
            env=_env(private_tmp),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"port {port} on 127.0.0.1 is already in use" in line, line
    assert "token-broker dev --port N" in line, line
    assert "make demo PORT=N" in line, line
    assert _left_in(private_tmp) == []
    assert _redis_servers_using(private_tmp) == []


def test_make_demo_passes_port_through() -> None:
    """`make demo PORT=9090` runs `token-broker dev --port 9090` (8080 unless PORT is given)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PORT", "MAKEFLAGS"}}
    commands = []
    for extra in ([], ["PORT=9090"]):
        result = subprocess.run(
            ["make", "-n", "demo", *extra],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        commands.append([line for line in result.stdout.splitlines() if "token-broker dev" in line])
    assert [len(lines) for lines in commands] == [1, 1], commands
    assert commands[0][0].endswith("token-broker dev --port 8080"), commands
    assert commands[1][0].endswith("token-broker dev --port 9090"), commands


def test_dev_cleans_up_when_redis_fails_to_start(tmp_path: Path) -> None:
    """A redis-server that exits at start: one error line, exit 1, nothing left in TMPDIR (the
    embedded Redis's own `tb-redis-*` directory used to stay behind)."""
    private_tmp = tmp_path / "tmp"
    failing = tmp_path / "redis-server"
    failing.write_text("#!/bin/sh\necho 'this redis-server refuses to start' >&2\nexit 1\n")
    failing.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "dev", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env=_env(private_tmp, BROKER_REDIS_SERVER=str(failing)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "refuses to start" in result.stderr
    assert _left_in(private_tmp) == []


def test_dev_cleans_up_on_sigterm_while_starting(tmp_path: Path) -> None:
    """SIGTERM while `dev` waits for its redis-server: the server is stopped and TMPDIR is left
    empty (SIGTERM used to kill `dev` on the spot, leaving `tb-redis-*` behind)."""
    private_tmp = tmp_path / "tmp"
    started = tmp_path / "started"
    slow = tmp_path / "redis-server"
    slow.write_text(f"#!/bin/sh\necho $$ > {started}.tmp\nmv {started}.tmp {started}\nexec sleep 60\n")
    slow.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "dev", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env=_env(private_tmp, BROKER_REDIS_SERVER=str(slow)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    server_pid: int | None = None
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the stand-in redis-server was never started"
            time.sleep(0.05)
        server_pid = int(started.read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert b"Traceback" not in err, err
        assert _wait_gone(server_pid), "the redis-server being started outlived `token-broker dev`"
        assert _left_in(private_tmp) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if server_pid is not None and not _wait_gone(server_pid, 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)
