"""HTTP pieces shared by the test authorization server's modules (tests/authserver.py and
tests/authserver_code.py): OAuth error answers, no-store JSON, form parsing, dropped connections.

A module of its own because ``python -m tests.authserver`` runs that file as ``__main__``: a
module importing ``tests.authserver`` back would get a second copy with other classes."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

CLOSE_KEY: Final = "authserver.close_connection"
FORM_TYPE: Final = "application/x-www-form-urlencoded"


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description

    def response(self) -> Response:
        headers = {"WWW-Authenticate": 'Basic realm="authserver"'} if self.status == 401 else {}
        return json_response({"error": self.error, "error_description": self.description}, self.status, headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status, headers={"Cache-Control": "no-store", "Pragma": "no-cache", **(headers or {})})


class CloseConnection(Response):
    """Sends nothing; AuthServer.__call__ then makes uvicorn drop the connection."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[CLOSE_KEY] = True


async def control_body(request: Request) -> Any:
    """A /_control request's JSON body; ValueError (a 400 for the caller) if it is not JSON."""
    try:
        return await request.json()
    except ValueError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None


def parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], str | None]:
    """Best-effort form fields plus what is wrong with the request body, if anything."""
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict")
    except ValueError:
        return {}, "request body is not ASCII form-urlencoded data with UTF-8 escapes"
    names = [name for name, _ in pairs]
    if content_type.split(";", maxsplit=1)[0].strip().lower() != FORM_TYPE:
        return dict(pairs), f"Content-Type must be {FORM_TYPE}"
    if len(set(names)) != len(names):
        return dict(pairs), "request parameters must not be repeated"
    return dict(pairs), None
