"""Helpers for fixtures: free ports, readiness polling, and the test authorization server process."""

from __future__ import annotations

import contextlib
import html.parser
import os
import signal
import socket
import ssl
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
from tests.authserver_login import DEFAULT_USERS
from tests.support_keyless import TlsFiles

__all__ = [
    "CLIENTS",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "DEFAULT_USERS",
    "REPO_ROOT",
    "WEIRD_CLIENT_ID",
    "WEIRD_CLIENT_SECRET",
    "AuthServerProcess",
    "BrokerProcess",
    "LoginForm",
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
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll until GET url answers below 500; fail early, with its output, if proc exits."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0, trust_env=False, verify=verify) as client:
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
    """tests/authserver.py in a child process. ``url`` is the issuer, final once started. With
    `tls` (tests/support_keyless.py), an HTTPS listener beside it at ``tls_url`` takes client
    certificates (tls_client_auth), and discovery names it in ``mtls_endpoint_aliases``."""

    def __init__(self, port: int | None = None, *, tls: TlsFiles | None = None) -> None:
        self._fixed_port = port is not None
        self.tls = tls
        self._set_port(port if port is not None else free_port())
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    def _set_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token_url = f"{self.url}/oauth/token"
        self.tls_port = free_port() if self.tls is not None else None
        self.tls_url = f"https://127.0.0.1:{self.tls_port}" if self.tls_port else None

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
                [sys.executable, "-m", "tests.authserver", "--port", str(self.port), *self._tls_args()],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_http(f"{self.url}/_control/health", proc=self._proc, log_path=self.log_path)
        if self.tls is not None:
            wait_http(
                f"{self.tls_url}/_control/health",
                proc=self._proc,
                log_path=self.log_path,
                verify=ssl.create_default_context(cafile=self.tls.server_ca_file),
            )

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            *("--tls-port", str(self.tls_port), "--tls-cert", self.tls.server_cert_file),
            *("--tls-key", self.tls.server_key_file, "--client-ca", self.tls.client_ca_file),
        ]

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

    def accept_secrets(self, *secrets: str, client_id: str = CLIENT_ID) -> None:
        """From now on `client_id` authenticates with any of `secrets` (and no other)."""
        response = self._http().post("/_control/clients", json={"client_id": client_id, "secrets": list(secrets)})
        response.raise_for_status()

    def register_keyless(self, client_id: str = CLIENT_ID, **registration: Any) -> dict[str, Any]:
        """Register how `client_id` authenticates without a secret (tests/authserver_keyless.py):
        `jwks={"keys": [public JWKs]}` (private_key_jwt) and/or `tls_client_auth_subject_dn="CN=…"`
        (tls_client_auth); None turns that method off. Gone after reset()."""
        result: dict[str, Any] = self._control("keyless", {"client_id": client_id, **registration})
        return result

    def requests_by_secret(self) -> list[tuple[str | None, int | None]]:
        """(secret sent, HTTP status answered) of each token request, oldest first."""
        return [(r["secret"], r["status"]) for r in self.stats()["requests"]]

    def reset(self) -> None:
        """Back to the start: config, users, registered redirect URIs, keys, grants, counters."""
        self._http().post("/_control/reset").raise_for_status()

    def _control(self, path: str, body: Any) -> Any:
        response = self._http().post(f"/_control/{path}", json=body)
        if response.status_code != 200:
            raise ValueError(f"authserver rejected {path} {body!r}: {response.text}")
        return response.json()

    def register_redirect_uris(self, *uris: str, client_id: str = CLIENT_ID) -> None:
        """The redirect URIs registered for client_id (replacing its earlier ones); none after reset()."""
        self._control("redirect_uris", {client_id: list(uris)})

    def set_users(self, users: dict[str, dict[str, str]]) -> None:
        """Replace the users: {username: {password, sub, email?, name?}} (DEFAULT_USERS after reset())."""
        self._control("users", users)

    def rotate_signing_key(self, *, publish: bool = True, retire_others: bool = False) -> dict[str, Any]:
        """Sign from now on with a new key; publish it in the JWKS or not (yet); drop the others from the
        JWKS or not. Returns {signing_kid, published_kids}."""
        result: dict[str, Any] = self._control("keys", {"publish": publish, "retire_others": retire_others})
        return result

    def publish_signing_key(self) -> dict[str, Any]:
        """Add the current (unpublished) signing key to the JWKS."""
        result: dict[str, Any] = self._control("keys", {"action": "publish"})
        return result

    def revoke_grants(self, *, sub: str | None = None, grant_id: str | None = None) -> list[str]:
        """Revoke grants as a user withdrawing consent at the portal would (revoked_reason "admin")."""
        body = {"sub": sub} if sub is not None else {"grant_id": grant_id}
        revoked: list[str] = self._control("revoke_grant", body)["revoked"]
        return revoked

    def grants(self) -> dict[str, dict[str, Any]]:
        grants: dict[str, dict[str, Any]] = self.stats()["grants"]
        return grants

    def login(
        self,
        authorize_url: str,
        username: str = "alice",
        password: str | None = None,
        *,
        decision: str = "allow",
    ) -> httpx.URL:
        """Be the user's browser: open authorize_url, fill in the login form and press Allow or Deny.
        Returns where the authorization server sends the browser (the client's redirect_uri with
        code or error, state, iss), without following it. The password defaults to the user's own.
        Fails with the page when there is no redirect (an error page, a wrong password)."""
        if password is None:
            password = DEFAULT_USERS[username].password
        with httpx.Client(timeout=10.0, trust_env=False) as browser:
            page = browser.get(authorize_url)
            if page.is_redirect:
                return httpx.URL(page.headers["location"])
            if page.status_code != 200:
                raise AssertionError(f"authorize answered {page.status_code}: {page.text}")
            form = LoginForm.parse(page.text)
            fields = {**form.hidden, "username": username, "password": password, "decision": decision}
            answer = browser.post(page.url.join(form.action), data=fields)
            if not answer.is_redirect:
                raise AssertionError(f"login answered {answer.status_code} without a redirect: {answer.text}")
            return httpx.URL(answer.headers["location"])


class LoginForm(html.parser.HTMLParser):
    """The login form of an authorization server's page: its action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.hidden: dict[str, str] = {}

    @classmethod
    def parse(cls, page: str) -> LoginForm:
        form = cls()
        form.feed(page)
        form.close()
        if not form.action:
            raise AssertionError(f"no form in the page: {page}")
        return form

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.action = values.get("action", "")
        elif tag == "input" and values.get("type") == "hidden":
            self.hidden[values["name"]] = values.get("value", "")


class BrokerProcess:
    """A real `token-broker serve` process (uvicorn, N workers) on a free port. `cwd` is where
    `python -m broker` finds the package: another tree (an older release) runs that tree's code.

    Every instance is in `BrokerProcess.instances`, and what it logged can be read piece by piece
    (`unread_output`): the suite's leak watch (tests/leakwatch.py) reads every line once, and
    `discard_log` hands it what is left before the file goes. `args` go to `serve` as they are."""

    instances: ClassVar[weakref.WeakSet[BrokerProcess]] = weakref.WeakSet()
    on_discard: ClassVar[Callable[[BrokerProcess, str], None] | None] = None

    def __init__(
        self,
        config: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.config = config
        self.workers = workers
        self.env = env or {}
        self.args = args
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
            *self.args,
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
