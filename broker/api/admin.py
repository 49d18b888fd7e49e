"""The admin API: the operators' credential vault at run time (spec §3.6).

Admin keys only (`[admins.NAME] key_sha256`): caller keys never work here, admin keys never get
tokens. Entries from the config file are listed but read-only (409 `read_only`). Secrets are
write-only: answers show `{"set": true, "fingerprint": …}`; a caller's key is shown once, when it
is made. Every change is validated exactly like the config file, stored sealed in Redis, applied
by every worker of every replica within a second, and written to the audit log.
"""

from __future__ import annotations

from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api.middleware import send_error
from broker.api.routes import json_body
from broker.api.state import Broker
from broker.callers import hash_key, new_caller_key
from broker.errors import BrokerError, InvalidRequest, NotFound, ReadOnly
from broker.secret import Secret
from broker.vault.models import AdminSettings, CallerIssuerSettings, CallerSettings, CredentialSettings
from broker.vault.registry import Snapshot
from broker.vault.sync import Document

__all__ = [
    "PREFIX",
    "AdminAuth",
    "caller",
    "caller_issuer",
    "credential",
    "list_caller_issuers",
    "list_callers",
    "list_credentials",
    "new_key",
]

audit = structlog.get_logger("broker.audit")

PREFIX = "/v1/admin/"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class AdminAuth:
    """Pure ASGI: admin routes need an admin key; nothing else passes through it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        broker: Broker = state["broker"]
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            admin = broker.registry.snapshot.admins.authenticate(authorization)
        except BrokerError as error:
            state["error"] = error.code
            await send_error(send, error)
            return
        state["admin"] = admin
        state["caller_name"] = f"admin:{admin.name}"
        await self.app(scope, receive, send)


def _broker(request: Request) -> Broker:
    broker: Broker = request.state.broker
    return broker


def _admin(request: Request) -> AdminSettings:
    admin: AdminSettings = request.state.admin
    return admin


def _name(request: Request) -> str:
    name: str = request.path_params["name"]
    return name


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=_NO_STORE)


def _secret_view(broker: Broker, secret: Secret) -> dict[str, Any]:
    view: dict[str, Any] = {"set": True, "fingerprint": broker.store.codec.fingerprint(secret.reveal())}
    if secret.source != "literal":
        view["from"] = secret.source  # e.g. "env:PAYMENTS_SECRET": a name, not a value
    return view


def _credential_view(broker: Broker, snapshot: Snapshot, credential: CredentialSettings) -> dict[str, Any]:
    view: dict[str, Any] = {"name": credential.name, "source": snapshot.source("credentials", credential.name)}
    for field in ("issuer", "token_url", "client_id", "auth_method", "audience", "resource"):
        value = getattr(credential, field)
        if value is not None:
            view[field] = value
    view["scopes"] = list(credential.scopes)
    view["default_scopes"] = list(credential.default_scopes)
    view["extra_params"] = dict(credential.extra_params)
    if len(credential.client_secrets) == 1:
        view["client_secret"] = _secret_view(broker, credential.client_secret)
    elif credential.client_secrets:  # rotating (spec §6.5): in the order they are tried
        view["client_secrets"] = [_secret_view(broker, secret) for secret in credential.client_secrets]
    if credential.private_key is not None:  # private_key_jwt: the key only as a fingerprint
        signing = credential.private_key.current()
        view["private_key"] = _secret_view(broker, credential.private_key.secret)
        view["signing_alg"] = signing.algorithm
        if signing.key_id is not None:
            view["key_id"] = signing.key_id
    if credential.tls_client is not None:  # tls_client_auth: file names, and what the certificate says
        cert_file, key_file, ca_file = credential.tls_client.files
        view["tls_client_cert"] = {
            "from": f"file:{cert_file}",
            "subject": credential.tls_client.subject,
            "not_after": credential.tls_client.not_after.isoformat().replace("+00:00", "Z"),
        }
        if key_file is not None:
            view["tls_client_key"] = {"from": f"file:{key_file}"}
        if ca_file is not None:
            view["tls_ca_file"] = {"from": f"file:{ca_file}"}
    return view


def _secret_fingerprints(view: dict[str, Any]) -> list[str] | str | None:
    """What the audit event names the credential's secret by: fingerprints, never values."""
    if "client_secrets" in view:
        return [v["fingerprint"] for v in view["client_secrets"]]
    for field in ("client_secret", "private_key"):
        if field in view:
            fingerprint: str = view[field]["fingerprint"]
            return fingerprint
    return None  # tls_client_auth: nothing secret is stored, the key stays in its file


def _caller_view(snapshot: Snapshot, caller: CallerSettings) -> dict[str, Any]:
    grants = {name: sorted(scopes) for name, scopes in sorted(caller.grants.items())}
    subjects = [
        s.subject if s.issuer is None else {"issuer": s.issuer, "subject": s.subject} for s in caller.jwt_subjects
    ]
    view: dict[str, Any] = {"name": caller.name, "source": snapshot.source("callers", caller.name), "grants": grants}
    if caller.rate_limit is not None:
        view["rate_limit_per_second"] = caller.rate_limit.per_second
        view["rate_limit_burst"] = caller.rate_limit.burst
    view["jwt_subjects"] = subjects
    view["has_key"] = bool(caller.key_sha256)
    return view


def _caller_issuer_view(snapshot: Snapshot, issuer: CallerIssuerSettings) -> dict[str, Any]:
    view: dict[str, Any] = {"name": issuer.name, "source": snapshot.source("caller_issuers", issuer.name)}
    view.update(issuer=issuer.issuer, audience=issuer.audience, algorithms=list(issuer.algorithms))
    if issuer.jwks_uri is not None:
        view["jwks_uri"] = issuer.jwks_uri
    return view


def _writable(snapshot: Snapshot, kind: str, name: str) -> None:
    if snapshot.source(kind, name) == "config":
        raise ReadOnly(f"{kind}.{name} comes from the config file: change it there.")


def _audit(request: Request, action: str, kind: str, name: str, **details: Any) -> None:
    audit.info(
        "audit.admin_change",
        logger="broker.audit",  # the field to route audit events to their own sink by
        admin=_admin(request).name,
        action=action,
        kind=kind,
        name=name,
        **details,
    )


# -- credentials ----------------------------------------------------------------------------------


async def list_credentials(request: Request) -> Response:
    broker = _broker(request)
    snapshot = broker.registry.snapshot
    views = [_credential_view(broker, snapshot, c) for _, c in sorted(snapshot.credentials.items())]
    return _json({"credentials": views})


async def get_credential(request: Request) -> Response:
    broker = _broker(request)
    snapshot = broker.registry.snapshot
    credential = snapshot.credentials.get(_name(request))
    if credential is None:
        raise NotFound(f"No credential named {_name(request)}.")
    return _json(_credential_view(broker, snapshot, credential))


async def _put_table(request: Request, kind: str) -> tuple[Broker, str, bool]:
    """PUT of a table shaped like the config file's `[credentials.NAME]` or
    `[caller_issuers.NAME]`, stored as given (the vault validates it like the config loader)
    → (broker, name, created)."""
    broker, name = _broker(request), _name(request)
    _writable(broker.registry.snapshot, kind, name)
    table = await json_body(request, broker.settings.server.max_body_bytes)

    def edit(document: Document) -> bool:
        entries: dict[str, dict[str, Any]] = getattr(document, kind)
        created = name not in entries
        entries[name] = table
        return created

    return broker, name, await broker.vault.change(edit)


async def put_credential(request: Request) -> Response:
    broker, name, created = await _put_table(request, "credentials")
    snapshot = broker.registry.snapshot
    credential = snapshot.credentials[name]
    view = _credential_view(broker, snapshot, credential)
    secret_fp = _secret_fingerprints(view)
    _audit(request, "create" if created else "replace", "credential", name, secret_fp=secret_fp)
    return _json(view, 201 if created else 200)


async def delete_credential(request: Request) -> Response:
    broker, name = _broker(request), _name(request)
    _writable(broker.registry.snapshot, "credentials", name)

    def edit(document: Document) -> list[str]:
        if document.credentials.pop(name, None) is None:
            raise NotFound(f"No credential named {name}.")
        granted = [caller for caller, table in document.callers.items() if name in table.get("grants", {})]
        for caller in granted:  # a grant of a credential that is gone goes with it
            document.callers[caller] = {
                **document.callers[caller],
                "grants": {cred: scopes for cred, scopes in document.callers[caller]["grants"].items() if cred != name},
            }
        return granted

    ungranted = await broker.vault.change(edit)
    purged = await broker.store.purge_credential(name)
    _audit(request, "delete", "credential", name, keys_purged=purged, grants_removed=ungranted)
    return Response(status_code=204, headers=_NO_STORE)


# -- callers --------------------------------------------------------------------------------------


async def list_callers(request: Request) -> Response:
    snapshot = _broker(request).registry.snapshot
    return _json({"callers": [_caller_view(snapshot, c) for _, c in sorted(snapshot.caller_entries.items())]})


async def get_caller(request: Request) -> Response:
    snapshot = _broker(request).registry.snapshot
    caller = snapshot.caller_entries.get(_name(request))
    if caller is None:
        raise NotFound(f"No caller named {_name(request)}.")
    return _json(_caller_view(snapshot, caller))


async def put_caller(request: Request) -> Response:
    broker, name = _broker(request), _name(request)
    _writable(broker.registry.snapshot, "callers", name)
    table = await json_body(request, broker.settings.server.max_body_bytes)
    if "key_sha256" in table:
        raise InvalidRequest(f"callers.{name}.key_sha256: is set by the broker (POST {PREFIX}callers/{name}/key).")
    key = new_caller_key()

    def edit(document: Document) -> tuple[bool, bool]:
        """(created, a new key made): a caller created with jwt_subjects gets no key (POST …/key adds one)."""
        existing = document.callers.get(name)
        entry = dict(table)
        if existing is not None and "key_sha256" in existing:
            entry["key_sha256"] = existing["key_sha256"]
        elif existing is None and "jwt_subjects" not in table:
            entry["key_sha256"] = hash_key(key)
        document.callers[name] = entry
        return existing is None, existing is None and "key_sha256" in entry

    created, keyed = await broker.vault.change(edit)
    snapshot = broker.registry.snapshot
    view = _caller_view(snapshot, snapshot.caller_entries[name])
    _audit(request, "create" if created else "replace", "caller", name)
    if keyed:
        return _json({**view, "caller_key": key}, 201)  # shown once; only its hash is kept
    return _json(view, 201 if created else 200)


async def new_key(request: Request) -> Response:
    broker, name = _broker(request), _name(request)
    _writable(broker.registry.snapshot, "callers", name)
    key = new_caller_key()

    def edit(document: Document) -> None:
        if name not in document.callers:
            raise NotFound(f"No caller named {name}.")
        document.callers[name] = {**document.callers[name], "key_sha256": hash_key(key)}

    await broker.vault.change(edit)
    _audit(request, "new_key", "caller", name)
    return _json({"name": name, "caller_key": key})


async def delete_caller(request: Request) -> Response:
    broker, name = _broker(request), _name(request)
    _writable(broker.registry.snapshot, "callers", name)

    def edit(document: Document) -> None:
        if document.callers.pop(name, None) is None:
            raise NotFound(f"No caller named {name}.")

    await broker.vault.change(edit)
    _audit(request, "delete", "caller", name)
    return Response(status_code=204, headers=_NO_STORE)


# -- caller issuers (spec §6.3) -------------------------------------------------------------------


async def list_caller_issuers(request: Request) -> Response:
    snapshot = _broker(request).registry.snapshot
    views = [_caller_issuer_view(snapshot, i) for _, i in sorted(snapshot.caller_issuers.items())]
    return _json({"caller_issuers": views})


async def get_caller_issuer(request: Request) -> Response:
    snapshot = _broker(request).registry.snapshot
    issuer = snapshot.caller_issuers.get(_name(request))
    if issuer is None:
        raise NotFound(f"No caller issuer named {_name(request)}.")
    return _json(_caller_issuer_view(snapshot, issuer))


async def put_caller_issuer(request: Request) -> Response:
    broker, name, created = await _put_table(request, "caller_issuers")
    snapshot = broker.registry.snapshot
    _audit(request, "create" if created else "replace", "caller_issuer", name)
    return _json(_caller_issuer_view(snapshot, snapshot.caller_issuers[name]), 201 if created else 200)


async def delete_caller_issuer(request: Request) -> Response:
    """Refused (400, naming them) while API callers' subjects name the issuer."""
    broker, name = _broker(request), _name(request)
    _writable(broker.registry.snapshot, "caller_issuers", name)

    def edit(document: Document) -> None:
        if document.caller_issuers.pop(name, None) is None:
            raise NotFound(f"No caller issuer named {name}.")

    await broker.vault.change(edit)
    _audit(request, "delete", "caller_issuer", name)
    return Response(status_code=204, headers=_NO_STORE)


# One route per resource (so a 405 lists every method of it in `Allow`), dispatched by method.
_CREDENTIAL = {"GET": get_credential, "PUT": put_credential, "DELETE": delete_credential}
_CALLER = {"GET": get_caller, "PUT": put_caller, "DELETE": delete_caller}
_CALLER_ISSUER = {"GET": get_caller_issuer, "PUT": put_caller_issuer, "DELETE": delete_caller_issuer}


async def credential(request: Request) -> Response:
    return await _CREDENTIAL[request.method](request)


async def caller(request: Request) -> Response:
    return await _CALLER[request.method](request)


async def caller_issuer(request: Request) -> Response:
    return await _CALLER_ISSUER[request.method](request)
