"""The leak watch (tests/leakwatch.py) catches what it is there to catch: planted leaks in a log
line, a broker's log file and answers read through every kind of httpx transport fail their
test, naming the kind of secret and where; the answers that hand a secret out do not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support import REPO_ROOT

PLANTED = textwrap.dedent(
    """
    import asyncio
    import json
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from tests.leakwatch import add_secret
    from tests.support import BrokerProcess

    SECRET = "planted-client-secret-0123456789"
    ODD_SECRET = 's3cr%t:+&= é"'
    TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwbGFudGVkIn0.c2lnbmF0dXJlLW9mLWl0"
    KEY = "tbk_planted-caller-key-0123456789abcdefghijkl"
    add_secret("client secret", SECRET, ODD_SECRET)


    async def token(request):
        return JSONResponse({"access_token": TOKEN, "token_type": "Bearer"})

    async def error(request):
        return JSONResponse({"error": "invalid_request", "error_description": f"bad {TOKEN}"}, 400)

    async def new_caller(request):
        return JSONResponse({"name": "x", "caller_key": KEY}, 201)

    async def show_caller(request):
        return JSONResponse({"name": "x", "caller_key": KEY})

    APP = Starlette(routes=[
        Route("/v1/tokens/x", token),
        Route("/v1/error", error),
        Route("/v1/admin/callers/x", new_caller, methods=["PUT"]),
        Route("/v1/admin/callers/x", show_caller, methods=["GET"]),
    ])


    def test_clean_answers_pass():
        with TestClient(APP) as client:
            assert client.get("/v1/tokens/x").json()["access_token"] == TOKEN
            assert client.put("/v1/admin/callers/x").json()["caller_key"] == KEY


    def test_secret_in_a_log_line():
        print(json.dumps({"event": "oops", "detail": SECRET}), file=sys.stderr)


    def test_json_escaped_secret_in_a_log_line():
        print(json.dumps({"event": "oops", "detail": ODD_SECRET}))


    def test_token_in_a_log_line():
        with TestClient(APP) as client:
            print("fetched", client.get("/v1/tokens/x").json()["access_token"])


    def test_token_in_an_error_answer():
        with TestClient(APP) as client:
            client.get("/v1/tokens/x")  # learned here
            client.get("/v1/error")


    def test_caller_key_in_an_answer_that_does_not_hand_it_out():
        with TestClient(APP) as client:
            client.put("/v1/admin/callers/x")  # handed out: fine, and now known
            client.get("/v1/admin/callers/x")  # shown again: a leak


    def test_token_in_an_async_answer():
        async def run():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(APP), base_url="http://t") as client:
                await client.get("/v1/tokens/x")
                await client.get("/v1/error")
        asyncio.run(run())


    def test_secret_in_an_answer_over_the_network():
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"error": "server_error", "error_description": SECRET}).encode()
                self.send_response(500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            httpx.get(f"http://127.0.0.1:{server.server_port}/anything", trust_env=False)
        finally:
            server.shutdown()


    def test_secret_in_a_broker_log_file(tmp_path):
        broker = BrokerProcess(tmp_path / "unused.toml")
        broker.log_path.write_text(json.dumps({"event": "upstream", "secret": SECRET}) + "\\n")
        broker.discard_log()


    def test_secret_in_a_running_broker_log(tmp_path):
        broker = BrokerProcess(tmp_path / "unused.toml")
        broker.log_path.write_text('{"event": "fine"}\\n' + json.dumps({"event": "later", "x": SECRET}) + "\\n")
        test_secret_in_a_running_broker_log.keep = broker  # still alive at teardown: read there
    """
)


def test_the_leak_watch_fails_the_test_that_leaked_and_says_what_and_where(tmp_path: Path) -> None:
    (tmp_path / "test_planted.py").write_text(PLANTED, encoding="utf-8")
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.leakwatch",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--junitxml={report}",
            "-q",
            "test_planted.py",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert report.exists(), done.stdout + done.stderr
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - the report we just wrote
        problem = case.find("error")
        if problem is None:
            problem = case.find("failure")
        outcomes[case.attrib["name"]] = "passed" if problem is None else problem.attrib.get("message", "")
    expected = {
        "test_clean_answers_pass": "passed",
        "test_secret_in_a_log_line": "client secret in the captured stderr of call",
        "test_json_escaped_secret_in_a_log_line": "client secret in the captured stdout of call",
        "test_token_in_a_log_line": "access token in the captured stdout of call",
        "test_token_in_an_error_answer": "access token in the answer to GET /v1/error (400)",
        "test_caller_key_in_an_answer_that_does_not_hand_it_out": (
            "caller key in the answer to GET /v1/admin/callers/x (200)"
        ),
        "test_token_in_an_async_answer": "access token in the answer to GET /v1/error (400)",
        "test_secret_in_an_answer_over_the_network": "client secret in the answer to GET /anything (500)",
        "test_secret_in_a_broker_log_file": "client secret in the log of the broker on port",
        "test_secret_in_a_running_broker_log": "client secret in the log of the broker on port",
    }
    assert set(outcomes) == set(expected), done.stdout
    for name, wanted in expected.items():
        if wanted == "passed":
            assert outcomes[name] == "passed", (name, outcomes[name])
        else:
            assert "secret leak during this test" in outcomes[name], (name, outcomes[name])
            assert wanted in outcomes[name], (name, outcomes[name])
    # the message names the kind and the place, never the secret
    assert "planted-client-secret" not in report.read_text()
