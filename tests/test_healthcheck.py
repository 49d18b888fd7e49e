"""The image's HEALTHCHECK, the command exactly as the Dockerfile has it, against real processes.

Defect (issue 10, item 2): the HEALTHCHECK probed `BROKER_SERVER_PORT` or 8080, so a broker whose
port came from `serve --port X` or from `[server] port` in its config was reported unhealthy.
Here the broker listens on a free port chosen with `--port`, and BROKER_SERVER_PORT is unset.
In the container the probe looks at PID 1; here it is pointed at the process with `--pid`.
`deploy/image_test.py` runs the same command in the built image (`podman healthcheck run`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.embedded_redis import terminate
from tests.support import REPO_ROOT, BrokerProcess, descendants, free_port, wait_http

pytestmark = pytest.mark.slow


def _healthcheck_command() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    command: list[str] = json.loads(line.split(" CMD ", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def _probe(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_healthcheck_command(), "--pid", str(pid)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(autouse=True)
def _no_port_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_SERVER_PORT", raising=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_healthy_on_the_port_given_with_serve_port(write_config: Callable[..., Path], workers: int) -> None:
    """With 2 workers uvicorn's supervisor holds the socket: it is the entrypoint, PID 1."""
    with BrokerProcess(write_config(), workers=workers) as broker:
        assert broker.proc is not None
        done = _probe(broker.proc.pid)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"healthy: port {broker.port}"


def test_healthy_when_the_broker_runs_below_an_init(write_config: Callable[..., Path], tmp_path: Path) -> None:
    """`docker run --init`: PID 1 is an init that listens on nothing; the broker is its child."""
    port = free_port()
    broker = f"{sys.executable} -m broker serve --config {write_config()} --port {port}"
    log = tmp_path / "broker.log"
    with log.open("wb") as out:
        init = subprocess.Popen(["sh", "-c", f"{broker}; true"], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30, proc=init, log_path=log)
        done = _probe(init.pid)
    finally:
        for pid in descendants(init.pid):
            os.kill(pid, signal.SIGTERM)
        terminate(init, timeout=15)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"healthy: port {port}"


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Something that listens but is not a broker: /healthz is 404."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=15, proc=server)
        yield server
    finally:
        terminate(server)


def test_unhealthy_when_healthz_does_not_answer_200(http_server: subprocess.Popen[bytes]) -> None:
    done = _probe(http_server.pid)
    assert done.returncode == 1
    assert done.stdout.startswith("unhealthy: http://127.0.0.1:")
    assert done.stdout.strip().endswith("/healthz: HTTP 404")


def test_unhealthy_when_nothing_listens() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        done = _probe(sleeper.pid)
    finally:
        terminate(sleeper)
    assert (done.returncode, done.stdout.strip()) == (
        1,
        f"unhealthy: process {sleeper.pid} and those below it listen on no TCP port",
    )
    gone = _probe(sleeper.pid)
    assert (gone.returncode, gone.stdout.strip()) == (1, f"unhealthy: no process {sleeper.pid}")
