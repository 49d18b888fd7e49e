"""The hit fast path (broker/api/fastpath.py) answers exactly what the Starlette route answers,
for `GET /v1/tokens/{credential}` and for the OAuth facade's `POST /oauth2/{credential}/token`.

Two brokers share one Redis, one upstream and one fake clock: `fast` (as built by create_app)
and `slow` (create_app(..., fast_path=False)). For each request, both answers must be the same
bytes: status, every header, body. A spy on the fast path tells which answers it served itself;
everything it does not serve must reach the Starlette app unchanged.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from starlette.responses import JSONResponse
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from broker import errors as errors_module
from broker.api import create_app
from broker.api.facade import token_response_parts as facade_token_response_parts
from broker.api.fastpath import FastPath, token_response_parts
from broker.api.state import Broker
from broker.clock import FakeClock
from broker.entries import CachedToken
from broker.settings import Settings, load_settings
from tests.conftest import ADMIN, ADMIN_KEY, CALLER_KEYS, READ, WRITE, auth
from tests.support import AuthServerProcess

HITS = [
    f"?scope={READ}",
    f"?scope={quote(f'{WRITE} {READ}')}",
    f"?scope={READ}+{WRITE}",
    f"?scope={quote(f'  {READ}   {WRITE} {READ} ')}",
    "?scope=" + quote(READ + "\t" + WRITE),
    f"?scope={READ}&min_ttl=0",
    f"?min_ttl=60&scope={READ}",
    f"?scope={READ}&min_ttl=000060",
    "",
    "?scope=",
    "?min_ttl=5",
]

# (path and query, headers) that the fast path must leave to Starlette.
FALL_THROUGH: list[tuple[str, dict[str, str]]] = [
    (f"/v1/tokens/payments?scope={READ}", {}),
    (f"/v1/tokens/payments?scope={READ}", {"Authorization": f"Basic {CALLER_KEYS['billing']}"}),
    (f"/v1/tokens/payments?scope={READ}", {"Authorization": "Bearer tbk_not-a-known-key-at-all"}),
    (f"/v1/tokens/payments?scope={READ}", {"Authorization": "Bearer"}),
    (f"/v1/tokens/payments?scope={READ}", auth("reporting")),
    (f"/v1/tokens/nope?scope={READ}", auth()),
    ("/v1/tokens/payments?scope=%22quoted%22", auth()),
    (f"/v1/tokens/payments?scope={READ}%C3%A9", auth()),
    (f"/v1/tokens/payments?scope={READ}&min_ttl=-1", auth()),
    (f"/v1/tokens/payments?scope={READ}&min_ttl=1.5", auth()),
    (f"/v1/tokens/payments?scope={READ}&min_ttl=99999999999", auth()),
    (f"/v1/tokens/payments?scope={READ}&scope={WRITE}", auth()),
    (f"/v1/tokens/payments?scope={READ}&min_ttl=1&min_ttl=2", auth()),
    (f"/v1/tokens/payments?scope={ADMIN}", auth()),
    (f"/v1/tokens/payments?scope={quote(f'{READ} {ADMIN}')}", auth()),
    (f"/v1/tokens/payments?scope={READ}&{'x' * 5000}=1", auth()),
    (f"/v1/tokens/payments/?scope={READ}", auth()),
    ("/v1/tokens/", auth()),
    (f"/v1/tokens/pay%2Fments?scope={READ}", auth()),
]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def brokers(settings: Settings, clock: FakeClock) -> Iterator[tuple[TestClient, TestClient]]:
    fast_app = create_app(settings, clock=clock)
    slow_app = create_app(settings, clock=clock, fast_path=False)
    with (
        TestClient(fast_app, raise_server_exceptions=False) as fast,
        TestClient(slow_app, raise_server_exceptions=False) as slow,
    ):
        yield fast, slow


def answer(client: TestClient, method: str, url: str, headers: dict[str, str]) -> tuple[int, list[Any], bytes]:
    response = client.request(method, url, headers=headers)
    return response.status_code, response.headers.multi_items(), response.content


def broker_of(client: TestClient) -> Broker:
    broker: Broker = client.app_state["broker"]
    return broker


def warm(fast: TestClient, slow: TestClient, clock: FakeClock) -> None:
    """Put the tokens used below into both workers' L1, and make them older than a second
    (a token fetched less than a second ago satisfies any min_ttl).

    Both hold the very same entries: a copy read from Redis is bounded by the key's PTTL at the
    time of the read, so two workers' copies may differ by a millisecond, and `expires_in` by one
    second. The comparison below is of the two code paths, not of two copies.
    """
    for query in (f"?scope={READ}", f"?scope={quote(f'{READ} {WRITE}')}", "?scope="):
        for client in (fast, slow):
            assert client.get(f"/v1/tokens/payments{query}", headers=auth()).status_code == 200
    source, target = broker_of(fast).tokens, broker_of(slow).tokens
    credential = broker_of(fast).settings.credentials["payments"]
    for scope_set in (READ, f"{READ} {WRITE}"):
        key = source.keys_for(credential, scope_set).token
        entry = source.l1.peek(key)
        assert entry is not None
        target.l1.put(key, entry)
    clock.advance(2)


def age_tokens(redis_url: str, clock: FakeClock, seconds: float) -> None:
    """Let `seconds` pass for the broker: its clock, and the TTLs of the tokens in Redis (a copy
    read from Redis is bounded by the key's own PTTL, which a fake clock cannot move)."""
    clock.advance(seconds)
    with redis.Redis.from_url(redis_url) as direct:
        for key in direct.scan_iter(match="tb:*:tok:*"):
            direct.pexpire(key, direct.pttl(key) - int(seconds * 1000))


@pytest.mark.parametrize("query", HITS)
def test_hits_are_served_by_the_fast_path_with_the_routes_answer(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, served: list[bool], query: str
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    served.clear()
    expected = answer(slow, "GET", f"/v1/tokens/payments{query}", auth())
    got = answer(fast, "GET", f"/v1/tokens/payments{query}", auth())
    assert served == [True]
    assert got == expected
    status, headers, body = got
    assert status == 200
    assert [(k, v) for k, v in headers if k != "content-length"] == [
        ("cache-control", "no-store"),
        ("pragma", "no-cache"),
        ("content-type", "application/json"),
    ]
    assert list(json.loads(body)) == ["access_token", "token_type", "expires_in", "expires_at", "scope"]


@pytest.mark.parametrize(("url", "headers"), FALL_THROUGH)
def test_everything_else_reaches_starlette_unchanged(
    brokers: tuple[TestClient, TestClient],
    clock: FakeClock,
    served: list[bool],
    authserver: AuthServerProcess,
    url: str,
    headers: dict[str, str],
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    served.clear()
    fetched = authserver.token_requests()
    expected = answer(slow, "GET", url, headers)
    got = answer(fast, "GET", url, headers)
    assert not any(served)
    assert got == expected
    assert got[0] >= 400
    assert authserver.token_requests() == fetched


def test_other_methods_and_routes_are_not_looked_at(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, served: list[bool]
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    served.clear()
    for method, url in [
        ("HEAD", f"/v1/tokens/payments?scope={READ}"),
        ("POST", f"/v1/tokens/payments?scope={READ}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/tokensx/payments"),
    ]:
        assert answer(fast, method, url, auth()) == answer(slow, method, url, auth()), (method, url)
    assert served == []


def test_unknown_query_parameters_go_to_starlette(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, served: list[bool]
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    served.clear()
    url = f"/v1/tokens/payments?scope={READ}&debug=1"
    got = answer(fast, "GET", url, auth())
    assert served == [False]
    assert got == answer(slow, "GET", url, auth())
    assert got[0] == 200


def test_a_miss_falls_through_and_the_next_request_is_a_fast_hit(
    brokers: tuple[TestClient, TestClient], served: list[bool], authserver: AuthServerProcess
) -> None:
    fast, _ = brokers
    first = fast.get(f"/v1/tokens/ledger?scope={READ}", headers=auth())
    second = fast.get(f"/v1/tokens/ledger?scope={READ}", headers=auth())
    assert served == [False, True]
    assert first.json()["access_token"] == second.json()["access_token"]
    assert authserver.token_requests() == 1


def test_min_ttl_longer_than_the_token_has_left_is_not_a_fast_hit(
    brokers: tuple[TestClient, TestClient],
    clock: FakeClock,
    served: list[bool],
    authserver: AuthServerProcess,
    redis_url: str,
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    age_tokens(redis_url, clock, 2000)  # 1598 s left of 3600, before the refresh point (60-80 %)
    before = fast.get(f"/v1/tokens/payments?scope={READ}", headers=auth()).json()
    served.clear()
    fetched = authserver.token_requests()
    # more than is left, less than half the lifetime (min_ttl asks for at most that much)
    response = fast.get(f"/v1/tokens/payments?scope={READ}&min_ttl={before['expires_in'] + 100}", headers=auth())
    assert served == [False]
    assert response.status_code == 200
    assert response.json()["access_token"] != before["access_token"]
    assert authserver.token_requests() == fetched + 1


def test_expires_in_is_computed_for_each_response(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, served: list[bool]
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    first = fast.get(f"/v1/tokens/payments?scope={READ}", headers=auth())
    clock.advance(123.6)
    second = fast.get(f"/v1/tokens/payments?scope={READ}", headers=auth())
    assert served[-2:] == [True, True]
    assert first.json()["expires_in"] - second.json()["expires_in"] in {123, 124}
    assert second.json()["expires_at"] == first.json()["expires_at"]
    assert int(second.headers["content-length"]) == len(second.content)


def _l1_hits_counted(client: TestClient) -> float:
    """token_requests_total{credential="payments",outcome="l1"} as /metrics shows it (rendering flushes)."""
    page = client.get("/metrics").text
    for line in page.splitlines():
        if line.startswith('token_broker_token_requests_total{credential="payments",outcome="l1"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_fast_hit_is_counted_audited_and_not_logged(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, served: list[bool]
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    broker = broker_of(fast)
    broker.audit.flush()
    l1_before = _l1_hits_counted(fast)
    served.clear()
    with capture_logs() as during:
        for _ in range(3):
            assert fast.get(f"/v1/tokens/payments?scope={READ}", headers=auth()).status_code == 200
    assert served == [True, True, True]
    assert during == []
    assert _l1_hits_counted(fast) == l1_before + 3
    with capture_logs() as audit:
        broker.audit.flush()
    assert [(e["event"], e["caller"], e["credential"], e["scope"], e["source"], e["count"]) for e in audit] == [
        ("audit.tokens_handed_out", "billing", "payments", READ, "l1", 3)
    ]


def test_refresh_ahead_is_started_by_a_fast_hit(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, served: list[bool], authserver: AuthServerProcess
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    current = fast.get(f"/v1/tokens/payments?scope={READ}", headers=auth()).json()
    clock.advance(0.85 * 3600)  # past the refresh point (0.6-0.8 of the cached window)
    fetched = authserver.token_requests()
    served.clear()
    response = fast.get(f"/v1/tokens/payments?scope={READ}", headers=auth())
    assert served == [True]
    assert response.json()["access_token"] == current["access_token"]  # callers keep the current token meanwhile
    deadline = time.monotonic() + 10
    while authserver.token_requests() == fetched and time.monotonic() < deadline:
        time.sleep(0.02)
    assert authserver.token_requests() == fetched + 1


def test_access_log_turns_the_fast_path_off(
    write_config: Callable[..., Path], clock: FakeClock, served: list[bool]
) -> None:
    settings = load_settings(write_config("[server]\naccess_log = true\n"))
    with TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as client:
        client.get(f"/v1/tokens/payments?scope={READ}", headers=auth())
        clock.advance(2)
        with capture_logs() as logs:
            assert client.get(f"/v1/tokens/payments?scope={READ}", headers=auth()).status_code == 200
    assert served == []
    assert [(e["event"], e["outcome"]) for e in logs if e["event"] == "request"] == [("request", "l1")]


@pytest.mark.parametrize(
    ("access_token", "scope"),
    [
        ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", f"{READ} {WRITE}"),
        ('opaque"with\\quotes/and\u2028separators', "urn:é:ünïcode"),
        ("\x00\x1f control", ""),
    ],
)
def test_pre_encoded_parts_are_the_routes_json(access_token: str, scope: str) -> None:
    entry = CachedToken(
        access_token=access_token,
        scope=scope,
        expires_at=1_900_000_000.75,
        expires=0.0,
        fresh_until=0.0,
        refresh_at=0.0,
        fetched_at=0.0,
        fingerprint="f" * 16,
    )
    head, tail = token_response_parts(entry)
    body = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": 42,
        "expires_at": "2030-03-17T17:46:40Z",
        "scope": scope,
    }
    assert head + b"42" + tail == JSONResponse(body).body


# -- the OAuth facade's token endpoint (broker/api/facade.py) ------------------------------------

FACADE = "/oauth2/payments/token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


def _billing() -> dict[str, str]:
    return {**FORM, **_basic("billing", CALLER_KEYS["billing"])}


def _percent_encoded(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


# (headers, body) of token requests the fast path answers itself
FACADE_HITS: list[tuple[dict[str, str], bytes]] = [
    (_billing(), b"grant_type=client_credentials"),
    (_billing(), f"grant_type=client_credentials&scope={READ}".encode()),
    (_billing(), f"scope={quote(f'{WRITE} {READ}')}&grant_type=client_credentials".encode()),
    (_billing(), f"grant_type=client_credentials&scope={READ}+{WRITE}".encode()),
    (_billing(), b"grant_type=client_credentials&scope="),
    (_billing(), b"grant_type=client_credentials&client_id=billing"),
    (_billing(), b"grant_type=client_credentials&audience=ignored"),
    (
        {**_billing(), "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        b"grant_type=client_credentials",
    ),
    (
        {
            **FORM,
            "Authorization": "basic "
            + base64.b64encode(
                f"{_percent_encoded('billing')}:{_percent_encoded(CALLER_KEYS['billing'])}".encode()
            ).decode(),
        },
        b"grant_type=client_credentials",
    ),
    (FORM, f"grant_type=client_credentials&client_id=billing&client_secret={CALLER_KEYS['billing']}".encode()),
]

# (path, headers, body) that the fast path must leave to Starlette
FACADE_FALL_THROUGH: list[tuple[str, dict[str, str], bytes]] = [
    (FACADE, FORM, b"grant_type=client_credentials"),
    (FACADE, {**FORM, **_basic("billing", "tbk_not-a-known-key-at-all")}, b"grant_type=client_credentials"),
    (FACADE, {**FORM, **_basic("reporting", CALLER_KEYS["billing"])}, b"grant_type=client_credentials"),
    (FACADE, {**FORM, **auth()}, b"grant_type=client_credentials"),
    (FACADE, {**FORM, "Authorization": "Basic %%%"}, b"grant_type=client_credentials"),
    (FACADE, {**FORM, **_basic("reporting", CALLER_KEYS["reporting"])}, b"grant_type=client_credentials"),
    ("/oauth2/nope/token", _billing(), b"grant_type=client_credentials"),
    (FACADE, _billing(), b""),
    (FACADE, _billing(), b"grant_type=password"),
    (FACADE, _billing(), b"grant_type=client_credentials&grant_type=client_credentials"),
    (FACADE, _billing(), f"grant_type=client_credentials&scope={READ}&scope={READ}".encode()),
    (FACADE, _billing(), f"grant_type=client_credentials&scope={ADMIN}".encode()),
    (FACADE, _billing(), b"grant_type=client_credentials&scope=%22quoted%22"),
    (FACADE, _billing(), b"grant_type=client_credentials&client_secret=x"),
    (FACADE, _billing(), b"grant_type=client_credentials&x=\xff"),
    (FACADE, _billing(), b"&".join([b"a=1"] * 40)),
    (FACADE, _billing(), b"grant_type=client_credentials&x=" + b"y" * 20_000),
    (FACADE, {**_billing(), "Content-Type": "application/json"}, b'{"grant_type": "client_credentials"}'),
    ("/oauth2/payments/token/", _billing(), b"grant_type=client_credentials"),
    ("/oauth2/pay%2Fments/token", _billing(), b"grant_type=client_credentials"),
]


@pytest.fixture
def facade_brokers(write_config: Callable[..., Path], clock: FakeClock) -> Iterator[tuple[TestClient, TestClient]]:
    settings = load_settings(write_config('[server]\npublic_url = "http://testserver"\n'))
    with (
        TestClient(create_app(settings, clock=clock), raise_server_exceptions=False) as fast,
        TestClient(create_app(settings, clock=clock, fast_path=False), raise_server_exceptions=False) as slow,
    ):
        yield fast, slow


@pytest.fixture
def facade_served(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per facade token request that reached the fast path's checks: True if it answered."""
    calls: list[bool] = []
    original = FastPath._facade_hit

    def spy(self: FastPath, *args: Any) -> Any:
        answer = original(self, *args)
        calls.append(answer is not None)
        return answer

    monkeypatch.setattr(FastPath, "_facade_hit", spy)
    return calls


def post(client: TestClient, url: str, headers: dict[str, str], body: bytes) -> tuple[int, list[Any], bytes]:
    response = client.post(url, headers=headers, content=body)
    return response.status_code, response.headers.multi_items(), response.content


@pytest.mark.parametrize(("headers", "body"), FACADE_HITS)
def test_facade_hits_are_served_by_the_fast_path_with_the_routes_answer(
    facade_brokers: tuple[TestClient, TestClient],
    clock: FakeClock,
    facade_served: list[bool],
    headers: dict[str, str],
    body: bytes,
) -> None:
    fast, slow = facade_brokers
    warm(fast, slow, clock)
    facade_served.clear()
    expected = post(slow, FACADE, headers, body)
    got = post(fast, FACADE, headers, body)
    assert facade_served == [True]
    assert got == expected
    status, response_headers, content = got
    assert status == 200
    assert [(k, v) for k, v in response_headers if k != "content-length"] == [
        ("cache-control", "no-store"),
        ("pragma", "no-cache"),
        ("content-type", "application/json"),
    ]
    assert list(json.loads(content)) == ["access_token", "token_type", "expires_in", "scope"]


@pytest.mark.parametrize(("url", "headers", "body"), FACADE_FALL_THROUGH)
def test_everything_else_on_the_facade_reaches_starlette_unchanged(
    facade_brokers: tuple[TestClient, TestClient],
    clock: FakeClock,
    facade_served: list[bool],
    authserver: AuthServerProcess,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    fast, slow = facade_brokers
    warm(fast, slow, clock)
    facade_served.clear()
    fetched = authserver.token_requests()
    expected = post(slow, url, headers, body)
    got = post(fast, url, headers, body)
    assert not any(facade_served)
    assert got == expected
    assert got[0] >= 400
    assert authserver.token_requests() == fetched


def test_a_facade_miss_falls_through_with_its_body_and_the_next_request_is_a_fast_hit(
    facade_brokers: tuple[TestClient, TestClient], facade_served: list[bool], authserver: AuthServerProcess
) -> None:
    fast, _ = facade_brokers
    body = f"grant_type=client_credentials&scope={WRITE}".encode()
    first = fast.post(FACADE, headers=_billing(), content=body)
    second = fast.post(FACADE, headers=_billing(), content=body)
    assert facade_served == [False, True]
    assert first.status_code == second.status_code == 200
    assert first.json()["access_token"] == second.json()["access_token"]
    assert first.json()["scope"] == WRITE  # the route read the body the fast path had read
    assert authserver.token_requests() == 1


def test_a_body_sent_in_pieces_is_read_whole(facade_brokers: tuple[TestClient, TestClient], clock: FakeClock) -> None:
    """The fast path gathers every http.request message; the route gets all of them on a miss."""
    fast, slow = facade_brokers
    warm(fast, slow, clock)

    def pieces() -> Iterator[bytes]:
        yield b"grant_type=client_"
        yield b"credentials&scope="
        yield READ.encode()

    response = fast.post(FACADE, headers=_billing(), content=pieces())
    assert response.status_code == 200
    assert response.json()["scope"] == READ


def test_the_facade_is_not_served_fast_while_it_is_off(
    brokers: tuple[TestClient, TestClient], clock: FakeClock, facade_served: list[bool]
) -> None:
    fast, slow = brokers
    warm(fast, slow, clock)
    facade_served.clear()
    body = b"grant_type=client_credentials"
    got = post(fast, FACADE, _billing(), body)
    assert got == post(slow, FACADE, _billing(), body)
    assert got[0] == 404
    assert facade_served == []  # not even read: the route answers


def test_a_fast_facade_hit_is_counted_audited_and_not_logged(
    facade_brokers: tuple[TestClient, TestClient], clock: FakeClock, facade_served: list[bool]
) -> None:
    fast, slow = facade_brokers
    warm(fast, slow, clock)
    broker = broker_of(fast)
    broker.audit.flush()
    prefix = 'token_broker_facade_requests_total{credential="payments",outcome="l1"} '
    before = [line for line in fast.get("/metrics").text.splitlines() if line.startswith(prefix)]
    counted = float(before[0].removeprefix(prefix)) if before else 0.0
    facade_served.clear()
    with capture_logs() as during:
        for _ in range(2):
            assert fast.post(FACADE, headers=_billing(), content=b"grant_type=client_credentials").status_code == 200
    assert facade_served == [True, True]
    assert during == []
    assert f"{prefix}{counted + 2}" in fast.get("/metrics").text.splitlines()
    with capture_logs() as audit:
        broker.audit.flush()
    assert [(e["caller"], e["source"], e["via"], e["count"]) for e in audit] == [("billing", "l1", "oauth2", 2)]


@pytest.mark.parametrize(
    ("access_token", "scope"),
    [
        ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", f"{READ} {WRITE}"),
        ('opaque"with\\quotes/and\u2028separators', "urn:é:ünïcode"),
    ],
)
def test_pre_encoded_facade_parts_are_the_routes_json(access_token: str, scope: str) -> None:
    entry = CachedToken(access_token, scope, 1_900_000_000.75, 0.0, 0.0, 0.0, 0.0, "f" * 16)
    head, tail = facade_token_response_parts(entry)
    body = {"access_token": access_token, "token_type": "Bearer", "expires_in": 42, "scope": scope}
    assert head + b"42" + tail == JSONResponse(body).body


def _fast_path_of(client: TestClient) -> FastPath:
    node: Any = client.app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(node, FastPath):
        node = node.app
    return node


def test_the_fast_path_remembers_no_form_that_carries_a_client_secret(
    facade_brokers: tuple[TestClient, TestClient], clock: FakeClock, facade_served: list[bool]
) -> None:
    """Bodies are remembered to skip parsing them again, but never one with a secret in it."""
    fast, slow = facade_brokers
    warm(fast, slow, clock)
    secret = CALLER_KEYS["billing"]
    by_post = f"grant_type=client_credentials&client_id=billing&client_secret={secret}".encode()
    assert fast.post(FACADE, headers=FORM, content=by_post).status_code == 200
    assert fast.post(FACADE, headers=_billing(), content=b"grant_type=client_credentials").status_code == 200
    assert facade_served == [True, True]
    remembered = _fast_path_of(fast)._forms
    assert (FORM["Content-Type"], b"grant_type=client_credentials") in remembered
    assert not any(secret.encode() in body for _, body in remembered)


def test_a_remembered_scope_set_is_only_used_for_the_same_credential_and_grant() -> None:
    """The memo of the route's scope check is keyed by name but checked by identity: a credential
    or grant replaced at run time (a new object) is checked again, never answered from the memo."""
    from broker.secret import Secret
    from broker.vault.models import CredentialSettings

    fast = FastPath(app=None)  # type: ignore[arg-type]
    old = CredentialSettings(
        "c", "id", Secret("s", "literal"), token_url="https://a/t", scopes=(READ, WRITE), default_scopes=(READ,)
    )
    new = CredentialSettings(
        "c", "id", Secret("s", "literal"), token_url="https://a/t", scopes=(READ, WRITE), default_scopes=(WRITE,)
    )
    granted = frozenset({READ, WRITE})
    assert fast._scope_set(old, granted, None) == READ
    assert fast._scope_set(new, granted, None) == WRITE
    with pytest.raises(errors_module.InsufficientScope):
        fast._scope_set(new, frozenset({READ}), None)


def test_a_remembered_facade_authorization_ends_with_the_key_or_grant_it_was_made_under(
    facade_brokers: tuple[TestClient, TestClient], clock: FakeClock, facade_served: list[bool]
) -> None:
    """The fast path remembers what the checks found for a facade request under the SHA-256 of
    the request (never its credentials), for one snapshot of the registry only: a caller key
    rotated or a grant withdrawn through the admin API stops the remembered request at once."""
    fast, slow = facade_brokers
    warm(fast, slow, clock)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    made = fast.put("/v1/admin/callers/shipping", headers=admin, json={"grants": {"payments": [READ]}})
    assert made.status_code == 201, made.text
    old_key = made.json()["caller_key"]
    body = f"grant_type=client_credentials&scope={READ}".encode()
    old = {**FORM, **_basic("shipping", old_key)}
    facade_served.clear()
    assert [post(fast, FACADE, old, body)[0] for _ in range(3)] == [200, 200, 200]
    assert facade_served == [True, True, True]
    remembered = _fast_path_of(fast)._authorized
    assert remembered
    assert all(len(digest) == 32 for digest in remembered)  # hashes only
    assert not any(old_key in repr(found) for found in remembered.values())

    new_key = fast.post("/v1/admin/callers/shipping/key", headers=admin).json()["caller_key"]
    status, _, content = post(fast, FACADE, old, body)
    assert (status, json.loads(content)["error"]) == (401, "invalid_client")
    assert post(fast, FACADE, {**FORM, **_basic("shipping", new_key)}, body)[0] == 200

    withdrawn = fast.put("/v1/admin/callers/shipping", headers=admin, json={"grants": {}})
    assert withdrawn.status_code == 200, withdrawn.text
    status, _, content = post(fast, FACADE, {**FORM, **_basic("shipping", new_key)}, body)
    assert (status, json.loads(content)["error"]) == (400, "unauthorized_client")
