"""The hit fast path: `GET /v1/tokens/{credential}` and the OAuth facade's `POST
/oauth2/{credential}/token` answered from this worker's L1 in pure ASGI.

A request is answered here only if all of it is ordinary and it succeeds: a GET on that exact
route, a valid caller key, a grant for the credential, a query of at most one `scope` and one
`min_ttl` that parse, scopes within the grant, a token in L1 that satisfies `min_ttl`, and a
unit of the caller's rate limit already in this worker's hands (`RateLimiter.try_spend`, no I/O).
Anything else (any error, an L1 miss, an unusual query, HEAD, other routes, `access_log = true`)
goes to the Starlette app unchanged, which runs every check again in the order of spec §3.3:
errors and misses are answered by one code path only.

What a hit here does is what the Starlette route does for an L1 hit: the same checks through
the same helpers (`CallerRegistry.authenticate`, `scopes.parse`, `TokenService.get_l1`, which
also starts refresh-ahead), the same counter and audit record, the same body and headers, with
`expires_in` computed for each response. What it skips is the per-request work around it:
Request objects, routing, query parsing (parsed queries are cached), JSON encoding (each token's
response is encoded once, around a hole for `expires_in`) and the logging middleware, which
logs nothing for an L1 hit anyway.

The facade's token endpoint is served the same way, through the facade's own functions
(`facade.parse_token_request`, `authenticate`, `authorize`): the body is read here, within the
route's size limit, and replayed to the Starlette app message by message when the request is not
a hit, so the route reads exactly what the client sent. What those checks found for a request
is remembered under the SHA-256 of all they read (the client's credentials included, of which
only that hash is kept), for as long as the registry's snapshot is the same object: a repeated
request skips decoding Basic, parsing the form and hashing the key again, and any change to a
caller, a grant or a credential makes every request checked anew.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import scopes
from broker.api import facade
from broker.api.routes import MAX_QUERY_BYTES, scope_set_for
from broker.api.routes import parse_min_ttl as min_ttl_seconds  # the route's own check, not a copy
from broker.api.state import Broker
from broker.entries import CachedToken
from broker.errors import BrokerError, InvalidRequest
from broker.vault.models import CallerSettings, CredentialSettings

__all__ = ["FastPath", "token_response_parts"]

_PREFIX = "/v1/tokens/"
_PREFIX_LENGTH = len(_PREFIX)
_FACADE_PREFIX = "/oauth2/"
_FACADE_PREFIX_LENGTH = len(_FACADE_PREFIX)
_FACADE_SUFFIX = "/token"
_PARAMETERS = frozenset({"scope", "min_ttl"})
_MAX_QUERIES = 1024  # distinct query strings remembered; a caller fleet uses a handful


@dataclass(frozen=True, slots=True)
class _Query:
    requested: tuple[str, ...]  # parsed `scope`; empty: the credential's default scopes
    scope_set: str  # canonical form of `requested`
    min_ttl: int


@dataclass(frozen=True, slots=True)
class _Encoded:
    """One token's response around the hole for `expires_in`, and its headers by body length."""

    entry: CachedToken
    head: bytes
    tail: bytes
    headers: dict[int, list[tuple[bytes, bytes]]]


def _json(value: str) -> bytes:
    # What JSONResponse.render does for a string inside the body.
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def token_response_parts(entry: CachedToken) -> tuple[bytes, bytes]:
    """The route's JSON body for `entry` (key order and separators of JSONResponse), split
    around the value of `expires_in`."""
    expires_at = datetime.fromtimestamp(entry.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = b'{"access_token":' + _json(entry.access_token) + b',"token_type":"Bearer","expires_in":'
    tail = b',"expires_at":' + _json(expires_at) + b',"scope":' + _json(entry.scope) + b"}"
    return head, tail


def _parse_query(raw: bytes) -> _Query | None:
    """The route's reading of the query (same parser, same checks), or None if it is unusual."""
    if len(raw) > MAX_QUERY_BYTES:
        return None
    params = QueryParams(raw)
    if not _PARAMETERS.issuperset(params.keys()):
        return None
    scope_values = params.getlist("scope")
    ttl_values = params.getlist("min_ttl")
    if len(scope_values) > 1 or len(ttl_values) > 1:
        return None
    try:
        min_ttl = min_ttl_seconds(ttl_values[0] if ttl_values else None)
        requested = scopes.parse(scope_values[0]) if scope_values else ()
    except InvalidRequest:
        return None
    return _Query(requested, scopes.canonical(requested), min_ttl)


class FastPath:
    """Pure ASGI, in front of the Starlette app's routing; see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_encoded: int = 10_000) -> None:
        self.app = app
        self.max_encoded = max_encoded
        self._queries: dict[bytes, _Query | None] = {}
        self._encoded: dict[str, _Encoded] = {}  # by token fingerprint; checked by identity

        self._facade_encoded: dict[str, _Encoded] = {}
        # SHA-256 of a facade request's name, Authorization, Content-Type and body → what the
        # checks found for it, under the snapshot `_authorized_under` (see _authorized_request)
        self._authorized: dict[bytes, tuple[CallerSettings, CredentialSettings, str]] = {}
        self._authorized_under: object = None
        self._forms: dict[tuple[str | None, bytes], facade.Form] = {}  # bodies without a secret only
        # (credential, scope parameter) → the route's scope set, for these very objects
        self._scope_sets: dict[tuple[str, str | None], tuple[CredentialSettings, frozenset[str], str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if scope["method"] == "GET" and path.startswith(_PREFIX):
                answer = self._hit(scope)
                if answer is not None:
                    await send(answer[0])
                    await send(answer[1])
                    return
            elif scope["method"] == "POST" and path.startswith(_FACADE_PREFIX) and path.endswith(_FACADE_SUFFIX):
                replay = await self._facade(scope, receive, send)
                if replay is None:
                    return
                receive = replay
        await self.app(scope, receive, send)

    def _hit(self, scope: Scope) -> tuple[Message, Message] | None:
        name, slash, rest = scope["path"][_PREFIX_LENGTH:].partition("/")
        subject: str | None = None
        if slash:  # /v1/tokens/{credential}/subjects/{subject}: a user's token (spec §5.4)
            kind, _, subject = rest.partition("/")
            if kind != "subjects" or not subject:  # the rest is the subject, slashes and all
                return None
        state: Mapping[str, Any] | None = scope.get("state")
        if not name or scope.get("root_path") or state is None:
            return None
        broker: Broker | None = state.get("broker")
        if broker is None:
            return None
        authorization: str | None = None
        for header, value in scope["headers"]:
            if header == b"authorization":
                authorization = value.decode("latin-1")
                break
        snapshot = broker.registry.snapshot
        try:
            caller = snapshot.callers.authenticate(authorization)
        except BrokerError:
            return None
        granted = caller.grants.get(name)
        if granted is None:
            return None
        query = self._query(scope["query_string"])
        if query is None:
            return None
        credential = snapshot.credentials.get(name)
        if credential is None or (credential.grant == "authorization_code") != (subject is not None):
            return None
        if subject is not None and not broker.logins.allowed_here(credential, caller, subject):
            return None  # whose subject it is: the route reads the grant
        scope_set = query.scope_set
        if query.requested:
            if not granted.issuperset(query.requested):
                return None
        else:
            if not credential.default_scopes or not granted.issuperset(credential.default_scopes):
                return None  # no default scopes: the route answers 400 (spec §4.8)
            scope_set = scopes.canonical(credential.default_scopes)
        entry = broker.tokens.get_l1(credential, scope_set, query.min_ttl, subject)
        if entry is None or not broker.limiter.try_spend(caller):  # no unit at hand: the route decides
            return None
        ttl = entry.expires - broker.clock.monotonic()
        broker.tokens.stats.handout(name, "l1", ttl)
        broker.audit.record(caller.name, name, scope_set, entry.fingerprint, "l1")
        return _answer(self._encode(entry), ttl)

    # -- the OAuth facade's token endpoint ---------------------------------------------------------

    async def _facade(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Answer a facade hit (→ None), or give back a `receive` that replays what was read."""
        state: Mapping[str, Any] | None = scope.get("state")
        broker: Broker | None = state.get("broker") if state is not None else None
        name, _, rest = scope["path"][_FACADE_PREFIX_LENGTH:].partition("/")
        if broker is None or not name or rest != "token" or scope.get("root_path"):
            return receive
        if broker.settings.server.public_url is None:
            return receive  # the facade is off: the route says so
        limit = broker.settings.server.max_body_bytes
        messages: list[Message] = []
        size = 0
        while True:  # the route's limit: a longer body is never read whole here
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                break
            if not message.get("more_body", False):
                pieces = [m.get("body", b"") for m in messages] if len(messages) > 1 else None
                body = b"".join(pieces) if pieces is not None else message.get("body", b"")
                answer = self._facade_hit(scope, broker, name, body)
                if answer is not None:
                    await send(answer[0])
                    await send(answer[1])
                    return None
                break
        pending = deque(messages)

        async def replay() -> Message:
            return pending.popleft() if pending else await receive()

        return replay

    def _facade_hit(self, scope: Scope, broker: Broker, name: str, body: bytes) -> tuple[Message, Message] | None:
        authorization: bytes | None = None
        content_type: bytes | None = None
        for header, value in scope["headers"]:
            if header == b"authorization":
                authorization = value
            elif header == b"content-type":
                content_type = value
        authorized = self._authorized_request(broker, name, authorization, content_type, body)
        if authorized is None:
            return None
        caller, credential, scope_set = authorized
        entry = broker.tokens.get_l1(credential, scope_set, broker.settings.facade.min_ttl_seconds)
        if entry is None or not broker.limiter.try_spend(caller):  # no unit at hand: the route decides
            return None
        ttl = entry.expires - broker.clock.monotonic()
        broker.tokens.stats.handout(name, "l1", ttl, facade=True)
        broker.audit.record(caller.name, name, scope_set, entry.fingerprint, "l1", "oauth2")
        return _answer(self._encode(entry, self._facade_encoded, facade.token_response_parts), ttl)

    def _authorized_request(
        self, broker: Broker, name: str, authorization: bytes | None, content_type: bytes | None, body: bytes
    ) -> tuple[CallerSettings, CredentialSettings, str] | None:
        """What the route's checks find for this request (caller, credential, scope set), or
        None where they refuse it. Remembered under the SHA-256 of all that they read (the
        client's credentials included: only their hash is kept, as for caller keys) for as long
        as the registry's snapshot is the same object: a changed key, grant or credential is a
        new snapshot, and everything is checked again."""
        snapshot = broker.registry.snapshot
        if snapshot is not self._authorized_under:
            self._authorized.clear()
            self._authorized_under = snapshot
        digest = hashlib.sha256(b"\n".join((name.encode(), authorization or b"-", content_type or b"-", body))).digest()
        known = self._authorized.get(digest)
        if known is not None:
            return known
        try:
            request = facade.token_request(
                authorization.decode("latin-1") if authorization is not None else None,
                self._form(content_type.decode("latin-1") if content_type is not None else None, body),
            )
            caller = facade.authenticate(broker, request)
            credential, scope_set = facade.authorize(broker, caller, name, request, self._scope_set)
        except BrokerError:
            return None
        if len(body) <= MAX_QUERY_BYTES:
            if len(self._authorized) >= _MAX_QUERIES:
                self._authorized.clear()
            self._authorized[digest] = (caller, credential, scope_set)
        return caller, credential, scope_set

    def _form(self, content_type: str | None, body: bytes) -> facade.Form:
        """The route's reading of the body; remembered when it holds no client_secret (clients
        that use Basic send the same body every time)."""
        key = (content_type, body)
        form = self._forms.get(key)
        if form is None:
            form = facade.read_form(content_type, body)
            if "client_secret" not in form and len(body) <= MAX_QUERY_BYTES:
                if len(self._forms) >= _MAX_QUERIES:
                    self._forms.clear()
                self._forms[key] = form
        return form

    def _scope_set(self, credential: CredentialSettings, granted: frozenset[str], raw: str | None) -> str:
        """`routes.scope_set_for`, remembered for the same credential and grant objects (a changed
        credential or grant is another object: a miss)."""
        key = (credential.name, raw)
        known = self._scope_sets.get(key)
        if known is not None and known[0] is credential and known[1] is granted:
            return known[2]
        scope_set = scope_set_for(credential, granted, raw)  # raises as the route does
        if raw is None or len(raw) <= MAX_QUERY_BYTES:
            if len(self._scope_sets) >= _MAX_QUERIES:
                self._scope_sets.clear()
            self._scope_sets[key] = (credential, granted, scope_set)
        return scope_set

    def _query(self, raw: bytes) -> _Query | None:
        if len(raw) > MAX_QUERY_BYTES:
            return None  # the route answers 400; not worth remembering
        try:
            return self._queries[raw]
        except KeyError:
            pass
        if len(self._queries) >= _MAX_QUERIES:
            self._queries.clear()
        query = self._queries[raw] = _parse_query(raw)
        return query

    def _encode(
        self,
        entry: CachedToken,
        cache: dict[str, _Encoded] | None = None,
        parts: Callable[[CachedToken], tuple[bytes, bytes]] = token_response_parts,
    ) -> _Encoded:
        """`entry`'s answer, encoded once (by default the /v1 route's, in its own cache)."""
        cache = self._encoded if cache is None else cache
        encoded = cache.get(entry.fingerprint)
        if encoded is not None and encoded.entry is entry:
            return encoded
        head, tail = parts(entry)
        encoded = _Encoded(entry, head, tail, {})
        cache.pop(entry.fingerprint, None)
        while len(cache) >= self.max_encoded:
            del cache[next(iter(cache))]  # the oldest: L1 has let go of it by now
        cache[entry.fingerprint] = encoded
        return encoded


def _answer(encoded: _Encoded, ttl: float) -> tuple[Message, Message]:
    """The route's answer: 200, its headers in its order, the body with `expires_in` filled in."""
    body = encoded.head + b"%d" % max(0, int(ttl)) + encoded.tail
    headers = encoded.headers.get(len(body))
    if headers is None:
        headers = encoded.headers[len(body)] = [
            (b"cache-control", b"no-store"),
            (b"pragma", b"no-cache"),
            (b"content-length", b"%d" % len(body)),
            (b"content-type", b"application/json"),
        ]
    return (
        {"type": "http.response.start", "status": 200, "headers": headers},
        {"type": "http.response.body", "body": body},
    )
