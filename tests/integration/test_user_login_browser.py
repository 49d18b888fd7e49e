"""Issue 14: a user's whole login in a real browser — headless Chromium (Debian's `chromium`),
driven by Playwright — against a real broker process and the test authorization server.

    caller: POST /v1/authorizations/portal ─▶ authorize_url
    browser: open it ─▶ the login form ─▶ a wrong password (the form again) ─▶ the right one,
             Allow ─▶ the broker's callback page ("You are signed in as …")
    caller: GET /v1/tokens/portal/subjects/{sub} ─▶ the user's access token (the server's
            UserInfo endpoint takes it for that user)

Chromium missing is a failure, not a skip (`.ci/run` installs it), unless
BROKER_TEST_ALLOW_NO_BROWSER=1. Playwright's own browser download does not work here: it is
pointed at the system's binary, started with the flags this machine needs (no sandbox as root,
no background networking: the machine's closed network refuses it), in a new empty profile.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import READ, auth
from tests.support import AuthServerProcess, BrokerProcess
from tests.users import CALLBACK_PATH, PORTAL, subject_path, write_portal_config

pytestmark = pytest.mark.slow

OPT_OUT = "BROKER_TEST_ALLOW_NO_BROWSER"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str:
    """BROKER_TEST_CHROMIUM, or chromium on PATH; else fail (skip with BROKER_TEST_ALLOW_NO_BROWSER=1)."""
    found = os.environ.get("BROKER_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "no Chromium found (PATH, BROKER_TEST_CHROMIUM): apt-get install chromium (.ci/run does)"
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{reason}; skipped because {OPT_OUT}=1")
    pytest.fail(f"{reason}\nSet {OPT_OUT}=1 to skip the browser test on this machine instead.", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A Chromium context with a new, empty profile (cookies and storage of its own)."""
    binary = chromium_binary()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tb-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=binary, args=CHROMIUM_FLAGS, headless=True, timeout=60_000
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def broker(tmp_path: Path, redis_url: str, authserver: AuthServerProcess) -> Iterator[BrokerProcess]:
    """A real broker whose public_url is its own address: the browser comes back to it."""
    config = tmp_path / "browser.toml"
    process = BrokerProcess(config, workers=1)  # picks its port now: public_url can name it
    write_portal_config(
        config, redis_url, authserver, public_url=process.url, return_to_allow=(f"{process.url}/healthz",)
    )
    try:
        yield process.start()
    finally:
        output = process.output()
        process.stop()
        process.log_path.unlink(missing_ok=True)
        print(f"\n--- broker log, last lines ---\n{chr(10).join(output.splitlines()[-30:])}")


def start_login(broker: BrokerProcess, **body: str) -> str:
    started = httpx.post(f"{broker.url}/v1/authorizations/{PORTAL}", json=body, headers=auth(), timeout=15)
    assert started.status_code == 200, started.text
    url: str = started.json()["authorize_url"]
    return url


def test_a_user_logs_in_in_a_real_browser_and_the_caller_gets_their_token(
    browser: Any, broker: BrokerProcess, authserver: AuthServerProcess
) -> None:
    page = browser.new_page()
    try:
        # 1. the caller starts the login; the browser opens authorize_url: the login form
        page.goto(start_login(broker, scope=READ, login_hint="alice"))
        assert page.title() == "Sign in"
        assert page.input_value("input[name=username]") == "alice"  # the login_hint
        # 2. a wrong password: the form again, saying so
        page.fill("input[name=password]", "not-her-password")
        page.click("button[value=allow]")
        assert page.text_content("#message") == "Wrong username or password."
        # 3. the right one, Allow: the server redirects to the broker's callback
        page.fill("input[name=password]", "alice-password")
        with page.expect_response(lambda r: r.url.startswith(f"{broker.url}{CALLBACK_PATH}")) as landing:
            page.click("button[value=allow]")
        callback = landing.value
        page.wait_for_load_state()
        # 4. the broker's page: signed in, nothing to run, nothing to frame
        assert callback.status == 200
        headers = callback.headers
        assert headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["cache-control"] == "no-store"
        assert headers["x-frame-options"] == "DENY"
        assert page.title() == "Signed in"
        assert page.text_content("#message") == "You are signed in as user-alice."
    finally:
        page.close()
    # 5. the caller gets the user's token: the server knows it as alice's
    token = httpx.get(f"{broker.url}{subject_path('user-alice')}", headers=auth(), timeout=15)
    assert token.status_code == 200, token.text
    body = token.json()
    assert READ in body["scope"].split()  # as granted: the login's token carries `openid` too
    assert body["expires_in"] > 0
    stats = authserver.stats()
    assert (stats["logins"], stats["login_failures"], stats["code_exchanges"]) == (1, 1, 1)
    # the server's UserInfo endpoint takes the token as alice's
    userinfo = httpx.get(
        f"{authserver.url}/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"}, timeout=15
    )
    assert userinfo.status_code == 200, userinfo.text
    assert userinfo.json()["sub"] == "user-alice"
    # `reporting` (subjects = "any") gets the same token
    other = httpx.get(f"{broker.url}{subject_path('user-alice')}", headers=auth("reporting"), timeout=15)
    assert other.json()["access_token"] == body["access_token"]


def test_in_a_real_browser_a_denial_lands_on_an_error_page_and_return_to_is_followed(
    browser: Any, broker: BrokerProcess, authserver: AuthServerProcess
) -> None:
    page = browser.new_page()
    try:
        # bob says no: the broker's page says the sign-in did not complete (400)
        page.goto(start_login(broker, login_hint="bob"))
        page.fill("input[name=password]", "bob-password")
        with page.expect_response(lambda r: r.url.startswith(f"{broker.url}{CALLBACK_PATH}")) as landing:
            page.click("button[value=deny]")
        assert landing.value.status == 400
        page.wait_for_load_state()
        assert page.title() == "Sign-in did not complete"
        assert "access_denied" in (page.text_content("#message") or "")
        # then bob allows, with return_to: the browser ends up there
        page.goto(start_login(broker, login_hint="bob", return_to=f"{broker.url}/healthz"))
        page.fill("input[name=password]", "bob-password")
        with page.expect_navigation(url=f"{broker.url}/healthz"):
            page.click("button[value=allow]")
        assert page.url == f"{broker.url}/healthz"
    finally:
        page.close()
    token = httpx.get(f"{broker.url}{subject_path('auth0|bob-42')}", headers=auth(), timeout=15)
    assert token.status_code == 200, token.text
