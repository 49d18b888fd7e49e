"""The suite's leak watch: a pytest plugin that fails any test during which a secret showed up
where it must not (spec §6.1, README "Security").

It observes and changes nothing:

- every log line: what each BrokerProcess wrote (read piece by piece after every test, and what
  is left when its log file goes), and the test's captured stdout, stderr and log records (the
  in-process brokers' structlog and stdlib logging);
- every HTTP answer a test received through httpx (any client, the SDK's and Starlette's
  TestClient too): a tee at the transport layer records the body as the client reads it.

What must not appear, from a registry of known secrets: client secrets, caller and admin keys,
the hashes of caller keys, encryption keys and access tokens. tests/conftest.py registers the
suite's own; a test adds what it makes (`add_secret`); the watch learns access tokens from token
answers (a 200 JSON object with an `access_token`) and caller keys from the admin answers that
hand one out. The exceptions are exactly those: an access token in its token answer, a caller key
in the `caller_key` of `PUT /v1/admin/callers/{name}` (201) or `POST …/{name}/key`.

A leak fails the test it happened in, at its teardown, naming the kind of secret and where it
was (never the secret). Not covered: answers read without httpx (the SDK's `requests` session,
schemathesis, the raw-socket fuzzing) and the output of commands a test runs itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import zlib
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import pytest
from starlette.testclient import _TestClientTransport

from tests.support import BrokerProcess

__all__ = ["add_secret", "findings_in"]

_MIN_LENGTH = 8  # shorter values would match ordinary text
_BODY_LIMIT = 1 << 20  # bytes of an answer recorded; the rest streams through unread
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_CALLER_KEY_ANSWER = re.compile(r"(PUT /v1/admin/callers/[^/]+|POST /v1/admin/callers/[^/]+/key)")
# What must never be in a log line, and in an answer (access tokens: except their token answer).
_IN_LOGS = ("client secret", "caller key", "admin key", "caller key hash", "encryption key", "access token")
_IN_ANSWERS = _IN_LOGS


@dataclass
class Secrets:
    by_kind: dict[str, set[str]] = field(default_factory=dict)
    jwts: dict[str, str] = field(default_factory=dict)  # access tokens shaped like JWTs → kind

    def add(self, kind: str, *values: str) -> None:
        for value in values:
            if len(value) < _MIN_LENGTH:
                continue
            if kind == "access token" and _JWT.fullmatch(value):
                self.jwts[value] = kind  # found by shape, then looked up: any number stays cheap
            else:
                # as it is, and as a JSON log line or answer spells it (\u00e9, \", \\)
                spelled = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
                self.by_kind.setdefault(kind, set()).update(spelled)
            if kind in ("caller key", "admin key"):
                self.add("caller key hash", hashlib.sha256(value.encode()).hexdigest())

    def find(self, text: str, kinds: Iterable[str]) -> list[str]:
        wanted = set(kinds)
        found = [kind for kind, values in self.by_kind.items() if kind in wanted and any(v in text for v in values)]
        if "access token" in wanted and "eyJ" in text and any(m.group() in self.jwts for m in _JWT.finditer(text)):
            found.append("access token")
        return sorted(set(found))


SECRETS = Secrets()


def add_secret(kind: str, *values: str) -> None:
    """Register secrets a test made (kind: "client secret", "caller key", "admin key",
    "encryption key", "access token"): from now on they must not appear in logs or answers."""
    SECRETS.add(kind, *values)


def findings_in(text: str, where: str, kinds: Iterable[str] = _IN_LOGS) -> list[str]:
    return [f"{kind} in {where}" for kind in SECRETS.find(text, kinds)]


# -- answers ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    what: str  # "GET /v1/tokens/payments → 200"
    request_line: str
    status: int
    encoding: str
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, chunk: bytes) -> None:
        if self.size < _BODY_LIMIT:
            self.chunks.append(chunk[: _BODY_LIMIT - self.size])
        self.size += len(chunk)

    def body(self) -> str:
        raw = b"".join(self.chunks)
        if self.encoding in ("gzip", "deflate"):
            with contextlib.suppress(zlib.error):
                raw = zlib.decompressobj(47 if self.encoding == "gzip" else 15).decompress(raw)
        return raw.decode(errors="replace")


def _tees(module: Any) -> tuple[type, type]:
    """Stream wrappers for an httpx-like module (httpx, and httpx2 under Starlette's TestClient):
    each chunk is passed on as it comes and kept (up to _BODY_LIMIT); closing files the answer."""

    class SyncTee(module.SyncByteStream):
        def __init__(self, inner: Any, answer: Answer, done: list[Answer]) -> None:
            self.inner, self.answer, self.done = inner, answer, done

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner:
                self.answer.add(chunk)
                yield chunk

        def close(self) -> None:
            try:
                self.inner.close()
            finally:
                self.done.append(self.answer)

    class AsyncTee(module.AsyncByteStream):
        def __init__(self, inner: Any, answer: Answer, done: list[Answer]) -> None:
            self.inner, self.answer, self.done = inner, answer, done

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self.inner:
                self.answer.add(chunk)
                yield chunk

        async def aclose(self) -> None:
            try:
                await self.inner.aclose()
            finally:
                self.done.append(self.answer)

    return SyncTee, AsyncTee


def _answer(request: Any, response: Any) -> Answer:
    request_line = f"{request.method} {request.url.path}"
    return Answer(
        what=f"the answer to {request_line} ({response.status_code})",
        request_line=request_line,
        status=response.status_code,
        encoding=response.headers.get("content-encoding", "").lower(),
    )


_TEST_CONTROL = "/_control/"  # tests/authserver_http.py; no broker route starts so


def _secrets_of_answer(answer: Answer) -> list[str]:
    """Learn what the answer hands out legitimately, then search the rest of it."""
    if answer.request_line.split(" ", 1)[1].startswith(_TEST_CONTROL):
        return []  # the test authorization server's control API reports the secrets it was sent
    text = answer.body()
    if not text:
        return []
    try:
        body = json.loads(text) if text[:1] == "{" else None
    except (ValueError, RecursionError):  # not JSON, or nested too deep (the fuzzing's documents)
        body = None
    if isinstance(body, dict):
        token = body.get("access_token")
        if answer.status == 200 and isinstance(token, str):
            SECRETS.add("access token", token)
            body = {k: v for k, v in body.items() if k != "access_token"}
        key = body.get("caller_key")
        if isinstance(key, str) and answer.status in (200, 201) and _CALLER_KEY_ANSWER.fullmatch(answer.request_line):
            SECRETS.add("caller key", key)
            body = {k: v for k, v in body.items() if k != "caller_key"}
        text = json.dumps(body, ensure_ascii=False)
    return findings_in(text, answer.what, _IN_ANSWERS)


# -- the plugin ------------------------------------------------------------------------------------


class LeakWatch:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.logs: list[tuple[str, str]] = []
        self._undo: list[tuple[type, str, Any]] = []

    def install(self) -> None:
        answers = self.answers

        def tee_sync(original: Any, tee: type) -> Any:
            def handle_request(transport: Any, request: Any) -> Any:
                response = original(transport, request)
                response.stream = tee(response.stream, _answer(request, response), answers)
                return response

            return handle_request

        def tee_async(original: Any, tee: type) -> Any:
            async def handle_async_request(transport: Any, request: Any) -> Any:
                response = await original(transport, request)
                response.stream = tee(response.stream, _answer(request, response), answers)
                return response

            return handle_async_request

        sync_tee, async_tee = _tees(httpx)
        sync_tee2, _ = _tees(httpx2)
        for cls, name, wrap, tee in (
            (httpx.HTTPTransport, "handle_request", tee_sync, sync_tee),
            (httpx.AsyncHTTPTransport, "handle_async_request", tee_async, async_tee),
            (httpx.ASGITransport, "handle_async_request", tee_async, async_tee),
            (_TestClientTransport, "handle_request", tee_sync, sync_tee2),  # Starlette's, on httpx2
        ):
            original = cls.__dict__[name]
            self._undo.append((cls, name, original))
            setattr(cls, name, wrap(original, tee))
        BrokerProcess.on_discard = self._broker_log

    def uninstall(self) -> None:
        for cls, name, original in reversed(self._undo):
            setattr(cls, name, original)
        self._undo.clear()
        BrokerProcess.on_discard = None

    def _broker_log(self, broker: BrokerProcess, text: str) -> None:
        self.logs.append((f"the log of the broker on port {broker.port}", text))

    def collect(self, report: pytest.TestReport) -> list[str]:
        for broker in list(BrokerProcess.instances):
            self._broker_log(broker, broker.unread_output())
        found: list[str] = []
        answers, logs = list(self.answers), list(self.logs)
        self.answers.clear()
        self.logs.clear()
        for answer in answers:  # first: they teach the tokens and keys handed out
            found += _secrets_of_answer(answer)
        for where, text in logs:
            found += findings_in(text, where, _IN_LOGS)
        for title, content in report.sections:  # what pytest captured, every phase: "Captured stdout call"
            _, stream, phase = [*title.split(), "", "", ""][:3]
            found += findings_in(content, f"the captured {stream} of {phase}", _IN_LOGS)
        return sorted(set(found))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.when == "teardown":
            found = self.collect(report)
            if found:
                message = "secret leak during this test: " + "; ".join(found)
                if report.outcome == "failed":
                    report.sections.append(("secret leak", message))
                else:
                    report.outcome = "failed"
                    report.longrepr = message
        return report


def pytest_configure(config: pytest.Config) -> None:
    watch = LeakWatch()
    watch.install()
    config.pluginmanager.register(watch, "leakwatch-observer")
    config.add_cleanup(watch.uninstall)
