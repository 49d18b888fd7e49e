"""Real third-party OAuth clients, unchanged, against a real broker process's facade (spec §3.5).

Each library is used the way a service uses it today against an authorization server: only the
issuer (or token) URL and the credentials change; the credentials are a caller's name and key.
Every token is checked as the upstream's JWT: its signature against the key set the facade
publishes at `jwks_uri`, and its claims.

- Authlib `OAuth2Client` and `AsyncOAuth2Client`, metadata loaded from the discovery URL and
  handed to the session as Authlib's framework integrations do, `client_secret_basic` and
  `client_secret_post`; and Authlib's Starlette integration (`OAuth.register(server_metadata_url=…)`).
- httpx-auth `OAuth2ClientCredentials` (it authenticates with Basic only).
- requests-oauthlib `OAuth2Session` with `BackendApplicationClient`, Basic and the form body.
- Go's `golang.org/x/oauth2/clientcredentials` (Debian's golang-golang-x-oauth2-dev), both auth
  styles: built by the test in GOPATH mode. No Go is a failure unless BROKER_TEST_ALLOW_NO_GO=1.
- Node's openid-client 5 (the seed's sample) and 6, both auth methods: installed with npm into
  `.venv/share/token-broker-tests/node/` the first time. No node or npm is a failure unless
  BROKER_TEST_ALLOW_NO_NODE=1, which skips those tests instead.
- Many clients at once for a cold scope set: one upstream request.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx_auth
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuth2Client
from authlib.integrations.starlette_client import OAuth
from joserfc import jwt
from joserfc.jwk import KeySet

from broker.callers import hash_key, new_caller_key
from tests.conftest import ENCRYPTION_KEYS, SECRET_ENV, config_text
from tests.support import CLIENT_ID, CLIENT_SECRET, REPO_ROOT, AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow

CALLER = "orders-svc"
CALLER_KEY = new_caller_key()
CREDENTIAL = "orders"
SCOPES = [f"urn:orders:s{i:02d}" for i in range(24)]
NODE_PACKAGES = {"oidc5": "openid-client@5.7.1", "oidc6": "openid-client@6.9.0"}
NODE_DIR = REPO_ROOT / ".venv" / "share" / "token-broker-tests" / "node"
_scope_sets = iter(range(1, len(SCOPES) - 2))  # not the default scope set, nor openid-client's


def fresh_scope() -> str:
    """A scope set no other test asked for: its first request is a cold miss, and a client that
    failed to send it would get the default scope set instead, which no test asks for."""
    return SCOPES[next(_scope_sets)]


@pytest.fixture(scope="module")
def broker(
    redis_server: str, authserver_session: AuthServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """`token-broker serve` with 2 workers, the facade on at its own URL, credential `orders`
    (issuer discovery upstream) granted to caller `orders-svc`."""
    path = tmp_path_factory.mktemp("facade") / "broker.toml"
    process = BrokerProcess(path, workers=2, env={SECRET_ENV: CLIENT_SECRET, "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEYS})
    scopes = ", ".join(f'"{s}"' for s in SCOPES)
    extra = f"""
        [server]
        public_url = "{process.url}"

        [credentials.{CREDENTIAL}]
        issuer = "{authserver_session.url}"
        client_id = "{CLIENT_ID}"
        client_secret = {{ env = "{SECRET_ENV}" }}
        scopes = [{scopes}]
        default_scopes = ["{SCOPES[0]}"]

        [callers.{CALLER}]
        key_sha256 = "{hash_key(CALLER_KEY)}"
        [callers.{CALLER}.grants]
        {CREDENTIAL} = [{scopes}]
        """
    path.write_text(config_text(redis_server, authserver_session, textwrap.dedent(extra)), encoding="utf-8")
    with process:
        yield process


def issuer_of(broker: BrokerProcess) -> str:
    return f"{broker.url}/oauth2/{CREDENTIAL}"


def discovery_url(broker: BrokerProcess) -> str:
    return f"{issuer_of(broker)}/.well-known/openid-configuration"


def metadata(broker: BrokerProcess) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(discovery_url(broker), timeout=10).raise_for_status().json()
    return document


def assert_upstream_jwt(broker: BrokerProcess, authserver: AuthServerProcess, token: str, scope: str) -> None:
    """The upstream's own JWT: signed with a key the facade publishes, issued to our client."""
    keys = KeySet.import_key_set(httpx.get(metadata(broker)["jwks_uri"], timeout=10).json())
    claims = jwt.decode(token, keys).claims
    assert claims["iss"] == authserver.url
    assert claims["client_id"] == CLIENT_ID or claims.get("sub") == CLIENT_ID
    assert claims["scope"] == scope


def test_the_discovery_document_is_what_the_libraries_read(broker: BrokerProcess) -> None:
    document = metadata(broker)
    assert document["issuer"] == issuer_of(broker)  # byte for byte: the discovery URL without the suffix
    rfc8414 = httpx.get(f"{broker.url}/.well-known/oauth-authorization-server/oauth2/{CREDENTIAL}", timeout=10)
    assert rfc8414.status_code == 200
    assert rfc8414.json() == document


# -- Authlib ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_oauth2client_with_discovered_metadata(
    broker: BrokerProcess, authserver: AuthServerProcess, method: str
) -> None:
    scope = fresh_scope()
    # What Authlib's integrations do with server metadata: every key becomes a session argument.
    with OAuth2Client(
        client_id=CALLER, client_secret=CALLER_KEY, token_endpoint_auth_method=method, scope=scope, **metadata(broker)
    ) as client:
        token = client.fetch_token(grant_type="client_credentials")
    assert token["token_type"] == "Bearer"
    assert token["scope"] == scope
    assert 3000 < token["expires_in"] <= 3600
    assert not token.is_expired()
    assert_upstream_jwt(broker, authserver, token["access_token"], scope)
    assert authserver.token_requests() == 1


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_async_client_with_discovered_metadata(
    broker: BrokerProcess, authserver: AuthServerProcess, method: str
) -> None:
    scope = fresh_scope()

    async def fetch() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            document = (await http.get(discovery_url(broker))).raise_for_status().json()
        async with AsyncOAuth2Client(
            client_id=CALLER, client_secret=CALLER_KEY, token_endpoint_auth_method=method, scope=scope, **document
        ) as client:
            token: dict[str, Any] = await client.fetch_token(grant_type="client_credentials")
            return token

    token = asyncio.run(fetch())
    assert token["scope"] == scope
    assert_upstream_jwt(broker, authserver, token["access_token"], scope)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_starlette_integration_with_server_metadata_url(
    broker: BrokerProcess, authserver: AuthServerProcess, method: str
) -> None:
    scope = fresh_scope()
    oauth = OAuth()
    oauth.register(
        "broker",
        client_id=CALLER,
        client_secret=CALLER_KEY,
        server_metadata_url=discovery_url(broker),
        client_kwargs={"scope": scope, "token_endpoint_auth_method": method},
    )
    token = asyncio.run(oauth.broker.fetch_access_token(grant_type="client_credentials"))
    assert token["scope"] == scope
    assert_upstream_jwt(broker, authserver, token["access_token"], scope)


def test_authlib_sees_the_rfc6749_error(broker: BrokerProcess) -> None:
    from authlib.integrations.base_client.errors import OAuthError

    with (
        OAuth2Client(client_id=CALLER, client_secret="tbk_" + "x" * 43, **metadata(broker)) as client,
        pytest.raises(OAuthError) as caught,
    ):
        client.fetch_token(grant_type="client_credentials")
    assert caught.value.error == "invalid_client"


# -- httpx-auth -------------------------------------------------------------------------------------


def test_httpx_auth_client_credentials(broker: BrokerProcess, authserver: AuthServerProcess) -> None:
    scope = fresh_scope()
    httpx_auth.OAuth2.token_cache.clear()
    auth = httpx_auth.OAuth2ClientCredentials(metadata(broker)["token_endpoint"], CALLER, CALLER_KEY, scope=scope)
    with httpx.Client(auth=auth, timeout=10) as http:
        first = http.get(f"{broker.url}/healthz")
        second = http.get(f"{broker.url}/healthz")
    sent = first.request.headers["authorization"]
    assert sent.startswith("Bearer ")
    assert second.request.headers["authorization"] == sent  # its own cache: 3600 s left, 30 s early expiry
    assert_upstream_jwt(broker, authserver, sent.removeprefix("Bearer "), scope)
    assert authserver.token_requests() == 1


# -- requests-oauthlib ------------------------------------------------------------------------------


@pytest.mark.parametrize("include_client_id", [False, True], ids=["client_secret_basic", "client_secret_post"])
def test_requests_oauthlib_backend_application_client(
    broker: BrokerProcess, authserver: AuthServerProcess, monkeypatch: pytest.MonkeyPatch, include_client_id: bool
) -> None:
    """requests-oauthlib's client credentials grant as its documentation shows it; it sends Basic
    unless told to put the client id (and secret) in the body. The scope it sends is the
    BackendApplicationClient's (the session's is only compared with the answer's). It refuses
    plain-HTTP token URLs unless OAUTHLIB_INSECURE_TRANSPORT is set: the test broker is
    http://127.0.0.1."""
    from oauthlib.oauth2 import BackendApplicationClient
    from requests_oauthlib import OAuth2Session

    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    scope = fresh_scope()
    session = OAuth2Session(client=BackendApplicationClient(client_id=CALLER, scope=[scope]), scope=[scope])
    token = session.fetch_token(
        token_url=metadata(broker)["token_endpoint"],
        client_id=CALLER,
        client_secret=CALLER_KEY,
        include_client_id=include_client_id,
        timeout=10,
    )
    assert token["token_type"] == "Bearer"
    assert token["scope"] == [scope]  # oauthlib splits the granted scope string
    assert 3000 < token["expires_in"] <= 3600
    assert_upstream_jwt(broker, authserver, token["access_token"], scope)
    assert authserver.token_requests() == 1


# -- Go, golang.org/x/oauth2/clientcredentials -------------------------------------------------------

GO_PACKAGES = "golang-go golang-golang-x-oauth2-dev"
GO_PATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put their sources


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/integration/go_client/main.go built against Debian's x/oauth2 (GOPATH mode, no
    network). No Go toolchain is a failure unless BROKER_TEST_ALLOW_NO_GO=1, which skips."""
    go = shutil.which("go")
    if go is None or not (GO_PATH / "src/golang.org/x/oauth2/clientcredentials").is_dir():
        if os.environ.get("BROKER_TEST_ALLOW_NO_GO") == "1":
            pytest.skip(f"BROKER_TEST_ALLOW_NO_GO=1 and no Go with x/oauth2 (apt-get install {GO_PACKAGES})")
        pytest.fail(f"the Go client test needs apt-get install {GO_PACKAGES}; BROKER_TEST_ALLOW_NO_GO=1 skips it")
    root = tmp_path_factory.mktemp("go")
    source = root / "src" / "goclient"
    source.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("go_client") / "main.go", source / "main.go")
    binary = root / "go_client"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{root}:{GO_PATH}", "GOCACHE": str(root / "cache")}
    env.pop("GOFLAGS", None)
    done = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return binary


def run_go_client(binary: Path, broker: BrokerProcess, secret: str, scope: str) -> tuple[int, list[dict[str, Any]]]:
    token_url = metadata(broker)["token_endpoint"]
    done = subprocess.run(
        [str(binary), token_url, CALLER, scope],
        env={**os.environ, "GO_CLIENT_SECRET": secret},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_go_clientcredentials_both_auth_styles(
    broker: BrokerProcess, authserver: AuthServerProcess, go_client: Path
) -> None:
    """Go's `clientcredentials.Config` (Debian's golang.org/x/oauth2 0.3.0), `AuthStyleInHeader`
    and `AuthStyleInParams`: the upstream's token, one for both, which the library's own cache
    then reuses."""
    scope = f"{fresh_scope()} {fresh_scope()}"
    canonical = " ".join(sorted(scope.split()))
    code, results = run_go_client(go_client, broker, CALLER_KEY, scope)
    assert code == 0, results
    assert [r["style"] for r in results] == ["client_secret_basic", "client_secret_post"]
    for result in results:
        assert result["token_type"] == "Bearer"
        assert result["scope"] == canonical
        assert 3000 < result["expires_in"] <= 3600
        assert result["reused"]  # x/oauth2 keeps it until 10 s before its expiry
        assert_upstream_jwt(broker, authserver, result["access_token"], canonical)
    assert results[0]["access_token"] == results[1]["access_token"]
    assert authserver.token_requests() == 1


def test_go_clientcredentials_sees_the_rfc6749_error(broker: BrokerProcess, go_client: Path) -> None:
    code, results = run_go_client(go_client, broker, "tbk_" + "x" * 43, fresh_scope())
    assert code == 1
    for result in results:
        assert "invalid_client" in result["error"], result  # oauth2.RetrieveError quotes the body
        assert CALLER_KEY not in result["error"]


# -- many clients at once ---------------------------------------------------------------------------


def test_many_library_clients_at_once_cost_one_upstream_request(
    broker: BrokerProcess, authserver: AuthServerProcess
) -> None:
    """30 Authlib clients in threads and 30 async ones, each with its own token cache, ask for one
    cold scope set at the same moment, over both workers: the upstream sees one request."""
    scope = fresh_scope()
    authserver.configure(delay=0.3)
    document = metadata(broker)
    start = threading.Barrier(30)
    tokens: list[str] = []

    def one(index: int) -> None:
        method = "client_secret_basic" if index % 2 else "client_secret_post"
        with OAuth2Client(
            client_id=CALLER, client_secret=CALLER_KEY, token_endpoint_auth_method=method, scope=scope, **document
        ) as client:
            start.wait(timeout=10)
            tokens.append(client.fetch_token(grant_type="client_credentials")["access_token"])

    async def many_async() -> list[str]:
        async def fetch() -> str:
            async with AsyncOAuth2Client(client_id=CALLER, client_secret=CALLER_KEY, scope=scope, **document) as c:
                token: dict[str, Any] = await c.fetch_token(grant_type="client_credentials")
                return str(token["access_token"])

        return list(await asyncio.gather(*(fetch() for _ in range(30))))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    async_tokens = asyncio.run(many_async())
    for thread in threads:
        thread.join(timeout=30)
    assert len(tokens) == 30
    assert len(set(tokens + async_tokens)) == 1
    assert authserver.token_requests() == 1


# -- Node's openid-client ---------------------------------------------------------------------------


def _node_clients() -> Path:
    """openid-client 5 and 6 installed once under .venv (npm, exact versions)."""
    if os.environ.get("BROKER_TEST_ALLOW_NO_NODE") == "1" and not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("BROKER_TEST_ALLOW_NO_NODE=1 and no node/npm on PATH")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "the openid-client tests need node and npm (apt-get install nodejs npm);"
            " BROKER_TEST_ALLOW_NO_NODE=1 skips them"
        )
    wanted = {alias: spec.rsplit("@", 1)[1] for alias, spec in NODE_PACKAGES.items()}
    installed: dict[str, str] = {}
    for alias in NODE_PACKAGES:
        package = NODE_DIR / "node_modules" / alias / "package.json"
        if package.exists():
            installed[alias] = json.loads(package.read_text())["version"]
    if installed != wanted:
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        (NODE_DIR / "package.json").write_text('{"private": true}\n', encoding="utf-8")
        specs = [f"{alias}@npm:{spec}" for alias, spec in NODE_PACKAGES.items()]
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-save", *specs],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"npm install {' '.join(specs)} failed:\n{done.stdout}\n{done.stderr}")
    return NODE_DIR


def test_openid_client_5_and_6_unchanged(broker: BrokerProcess, authserver: AuthServerProcess) -> None:
    node_dir = _node_clients()
    script = Path(__file__).with_name("openid_client.mjs")
    target = node_dir / script.name
    target.write_text(script.read_text(encoding="utf-8"), encoding="utf-8")  # resolves the packages beside it
    scope = f"{SCOPES[-1]} {SCOPES[-2]}"  # the broker answers with the canonical scope set
    canonical = " ".join(sorted(scope.split()))
    done = subprocess.run(
        ["node", str(target), issuer_of(broker), CALLER, CALLER_KEY, scope],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps([{k: v for k, v in r.items() if k != "token_set"} for r in results]), file=sys.stderr)
    assert [(r["client"].split(".")[0], r["method"]) for r in results] == [
        ("openid-client 5", "client_secret_basic"),
        ("openid-client 5", "client_secret_post"),
        ("openid-client 6", "client_secret_basic"),
        ("openid-client 6", "client_secret_post"),
    ]
    for result in results:
        assert "error" not in result, result
        token_set = result["token_set"]
        assert token_set["issuer"] == issuer_of(broker)
        assert token_set["token_type"].lower() == "bearer"
        assert token_set["scope"] == canonical
        assert 3000 < token_set["expires_in"] <= 3600
        assert_upstream_jwt(broker, authserver, token_set["access_token"], canonical)
    assert len({r["token_set"]["access_token"] for r in results}) == 1  # one cached token for all four
    assert authserver.token_requests() == 1
