"""Fuzzing the OAuth facade's token endpoint like the JSON routes: form bodies and Basic headers.

What is thrown at `POST /oauth2/{credential}/token` (hypothesis, deterministic and bounded),
straight into the ASGI app with the facade on (the fast path included, as uvicorn hands
requests over):
- form bodies: every field of the grant in odd forms, repeated, percent-encoded junk, `%ff`,
  raw high bytes, thousands of fields, huge values, JSON and binary;
- client authentication: Basic headers of random bytes, with and without a colon,
  form-urlencoded or not, other schemes, several at once, credentials in the body too;
- Content-Type and Content-Length in every odd form, bodies in pieces.

Every answer must be: 200 with exactly the four fields of RFC 6749 §5.1, or a 4xx JSON body
whose `error` is one of RFC 6749 §5.2's codes and whose description is a sentence; never 5xx;
`Cache-Control: no-store` always; 401 with `WWW-Authenticate: Basic realm="token-broker"`; no
traceback, file path, client secret or caller key anywhere. A model of the rules (who is
authenticated, which check comes first) says which code the answer must carry.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from broker.api import create_app
from broker.api.facade import MAX_FORM_FIELDS
from broker.settings import load_settings
from tests.conftest import ADMIN, CALLER_KEYS, READ, WRITE
from tests.fuzz.test_api_fuzz import FUZZ, LEAKS, SCOPE_VALUE, Answer, asgi_request, deliveries

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

KEY = CALLER_KEYS["billing"]
FACADE_CODES = {"invalid_request", "invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"}
BASIC_CHALLENGE = b'Basic realm="token-broker"'
STATS: Counter[str] = Counter()
GRANTED = {"billing": {"payments": {READ, WRITE}, "ledger": {READ}}, "reporting": {"ledger": {READ}}}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfacade fuzz: {sum(v for k, v in STATS.items() if k.startswith('status:'))} cases")
    for key, count in sorted(STATS.items()):
        print(f"  {key}: {count}")


@pytest.fixture
def facade(write_config: Callable[..., Path]) -> Iterator[TestClient]:
    settings = load_settings(write_config('[server]\npublic_url = "http://testserver"\n'))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _b64(text: bytes) -> bytes:
    return base64.b64encode(text)


NAME = st.sampled_from(["billing", "billing", "reporting", "nobody", "", "bill%69ng", "billing ", "b:illing"])
SECRET = st.one_of(
    st.sampled_from([KEY, KEY, CALLER_KEYS["reporting"], "", KEY + "x", KEY[:-1], quote(KEY), "tbk_" + "é" * 20]),
    st.text(max_size=30),
)
BASIC = st.one_of(
    st.builds(lambda n: b"Basic " + _b64(f"{n}:{CALLER_KEYS[n]}".encode()), st.sampled_from(["billing", "reporting"])),
    st.builds(lambda n: b"Basic " + _b64(f"{n}:{CALLER_KEYS[n]}".encode()), st.sampled_from(["billing", "reporting"])),
    st.builds(lambda n, s: b"Basic " + _b64(f"{n}:{s}".encode()), NAME, SECRET),
    st.builds(lambda n, s: b"Basic " + _b64(f"{quote(n, safe='')}:{quote(s, safe='')}".encode()), NAME, SECRET),
    st.builds(lambda raw: b"Basic " + _b64(raw), st.binary(max_size=60)),  # any bytes, colon or not
    st.builds(
        lambda junk: b"Basic " + junk, st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    ),
    st.sampled_from([b"Basic", b"Basic ", b"basic " + _b64(f"billing:{KEY}".encode()), b"Bearer " + KEY.encode(), b""]),
    st.builds(lambda n: b"Basic " + b"A" * n, st.integers(100, 12_000)),
)
FIELD = st.sampled_from(["grant_type", "scope", "client_id", "client_secret", "audience", "GRANT_TYPE", "", "x"])
VALUE = st.one_of(
    st.sampled_from(["client_credentials", "client_credentials", "password", "", "client_credentials "]),
    st.sampled_from(["billing", KEY, READ, WRITE, ADMIN, f"{READ} {WRITE}"]),
    SCOPE_VALUE,
    st.text(max_size=20),
)
PAIR = st.one_of(
    st.builds(lambda k, v: quote(k, safe="") + "=" + quote(v, safe=""), FIELD, VALUE),
    st.builds(lambda k, v: k + "=" + v, FIELD, st.text(max_size=20)),  # unencoded: & = + % inside
    st.sampled_from(["=", "&", "grant_type", "scope=%ff%fe", "scope=%", "grant_type=%zz", "a=%C3"]),
)
GRANT_TYPE = st.sampled_from(["client_credentials"] * 6 + ["password", "", "client_credentials ", "CLIENT_CREDENTIALS"])
PLAUSIBLE = st.builds(
    lambda grant_types, scopes, extra: "&".join(
        [f"grant_type={quote(g, safe='')}" for g in grant_types]
        + [f"scope={quote(v, safe='')}" for v in scopes]
        + extra
    ).encode(),
    st.lists(GRANT_TYPE, min_size=0, max_size=2),
    st.lists(SCOPE_VALUE, min_size=0, max_size=2),
    st.lists(PAIR, max_size=2),
)
FORM_BODY = st.one_of(
    PLAUSIBLE,
    PLAUSIBLE,
    PLAUSIBLE,
    st.builds(lambda pairs: "&".join(pairs).encode(), st.lists(PAIR, max_size=8)),
    st.builds(lambda pairs: ("grant_type=client_credentials&" + "&".join(pairs)).encode(), st.lists(PAIR, max_size=5)),
    st.binary(max_size=200),
    st.builds(lambda n: b"&".join([b"grant_type=client_credentials"] + [b"a=1"] * n), st.integers(1, 3000)),
    st.builds(lambda n: b"grant_type=client_credentials&pad=" + b"x" * n, st.integers(1000, 40_000)),
    st.sampled_from([b"", b'{"grant_type": "client_credentials"}', b"grant_type=client_credentials\x00"]),
)


def _form_type(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """What the last Content-Type says (the form type or not), as Starlette's Headers reads it."""
    values = [v for k, v in headers if k == b"content-type"]
    return values[0] if values else None


def expected_codes(
    credential: str, authorization: bytes | None, content_type: bytes | None, body: bytes, limit: int
) -> set[int | str]:
    """A model of the rules: the codes (or status 200) the first failing check may answer with.

    Where the model cannot be sure of one answer (an odd Content-Length, bodies that are not
    text), it allows the codes of the checks that may come first."""
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    if len(body) > limit:
        return {"invalid_request"}
    if body and media != b"application/x-www-form-urlencoded":
        return {"invalid_request"}
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # not UTF-8, too many fields
        return {"invalid_request"}
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    ids, secrets = fields.get("client_id", []), fields.get("client_secret", [])
    if len(ids) > 1 or len(secrets) > 1:
        return {"invalid_request"}
    name = key = None
    if authorization:
        text = authorization.decode("latin-1")
        scheme, _, value = text.partition(" ")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except ValueError:
            return {"invalid_client"}
        if scheme.lower() != "basic" or ":" not in decoded:
            return {"invalid_client"}
        raw_name, _, raw_key = decoded.partition(":")
        name, key = unquote_plus(raw_name), unquote_plus(raw_key)
        if secrets or (ids and ids[0] != name):
            return {"invalid_request"}
    elif ids and secrets:
        name, key = ids[0], secrets[0]
    else:
        return {"invalid_client"}
    if name not in CALLER_KEYS or CALLER_KEYS[name] != key:
        return {"invalid_client"}
    granted = GRANTED[name].get(credential)
    if granted is None:
        return {"unauthorized_client"}
    grant_types, scopes = fields.get("grant_type", []), fields.get("scope", [])
    if len(grant_types) != 1:
        return {"invalid_request"}
    if grant_types[0] != "client_credentials":
        return {"unsupported_grant_type"}
    if len(scopes) > 1:
        return {"invalid_request"}
    return {200, "invalid_scope"}  # the scope rules themselves are tested in tests/unit/test_scopes.py


def check_facade(credential: str, answer: Answer, sent: bytes, expected: set[int | str] | None) -> None:
    STATS[f"status:{answer.status}"] += 1
    if answer.status >= 400 and answer.body.startswith(b"{"):
        STATS[f"error:{json.loads(answer.body).get('error')}"] += 1
    assert answer.raised is None, f"the app raised {answer.raised!r}"
    assert answer.status < 500, f"{answer.status} {answer.body[:300]!r}"
    assert answer.header(b"cache-control") == b"no-store"
    assert (answer.header(b"content-type") or b"").split(b";")[0] == b"application/json"
    head = b"\n".join(k + b": " + v for k, v in answer.headers).decode("latin-1")
    text = answer.body.decode("utf-8", "replace")
    sent_text = sent.decode("latin-1")
    for leak in LEAKS:
        assert leak not in head, f"headers carry {leak!r}"
        if leak not in sent_text and quote(leak, safe="") not in sent_text:
            assert leak not in text, f"body carries {leak!r}: {text[:300]}"
    body = json.loads(answer.body)
    if answer.status == 200:
        assert list(body) == ["access_token", "token_type", "expires_in", "scope"], body
        assert credential in {"payments", "ledger"}
        if expected is not None:
            assert 200 in expected, (expected, body)
        return
    assert answer.status in {400, 401}, answer.status
    assert set(body) == {"error", "error_description"}, body
    assert body["error"] in FACADE_CODES, body
    assert isinstance(body["error_description"], str), body
    assert body["error_description"].strip(), body
    assert (answer.status == 401) == (body["error"] == "invalid_client"), body
    if answer.status == 401:
        assert answer.header(b"www-authenticate") == BASIC_CHALLENGE
    if expected is not None:
        assert body["error"] in expected, (expected, body)


@settings(FUZZ, max_examples=700)
@given(
    credential=st.sampled_from(["payments", "payments", "ledger", "nope"]),
    authorization=st.one_of(st.none(), BASIC),
    body=FORM_BODY,
    content_type=st.sampled_from(
        [b"application/x-www-form-urlencoded"] * 4
        + [b"application/x-www-form-urlencoded; charset=utf-8", b"APPLICATION/X-WWW-FORM-URLENCODED", b"text/plain"]
        + [b"application/json", b"", b"multipart/form-data; boundary=x"]
    ),
)
def test_random_token_requests(
    facade: TestClient, credential: str, authorization: bytes | None, body: bytes, content_type: bytes
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    path, answer = asgi_request(facade, "POST", f"/oauth2/{credential}/token".encode(), b"", headers, [body])
    assert path == f"/oauth2/{credential}/token"
    limit = 16_384
    expected = expected_codes(credential, authorization, content_type, body, limit)
    check_facade(credential, answer, body + (authorization or b""), expected)


@settings(FUZZ, max_examples=300)
@given(
    body_and_delivery=FORM_BODY.flatmap(lambda body: st.tuples(st.just(body), deliveries(body))),
    authorization=st.sampled_from([b"Basic " + _b64(f"billing:{KEY}".encode()), b""]),
)
def test_random_deliveries_of_a_form(
    facade: TestClient,
    body_and_delivery: tuple[bytes, tuple[list[tuple[bytes, bytes]], list[bytes]]],
    authorization: bytes,
) -> None:
    """Content-Length absent, short, long or garbage; the body in pieces: a precise 4xx or a token."""
    body, (headers, chunks) = body_and_delivery
    headers = [(k, b"application/x-www-form-urlencoded" if k == b"content-type" else v) for k, v in headers]
    if authorization:
        headers.append((b"authorization", authorization))
    _, answer = asgi_request(facade, "POST", b"/oauth2/payments/token", b"", headers, chunks)
    check_facade("payments", answer, body + authorization, None)


def test_the_facade_still_answers_after_the_fuzzing(facade: TestClient) -> None:
    response = facade.post(
        "/oauth2/payments/token",
        headers={"Authorization": "Basic " + _b64(f"billing:{KEY}".encode()).decode()},
        data={"grant_type": "client_credentials"},
    )
    assert response.status_code == 200, response.text
