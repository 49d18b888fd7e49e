"""The HTTP clients that present a TLS client certificate (`tls_client_auth`, RFC 8705 §2.1).

A certificate belongs to the connection, so each certificate gets an httpx client of its own
(the shared one presents none), made like the shared one (timeouts, pool, no redirects, no env).
Keyed by the certificate's files; when their contents change (broker/client_cert.py), the next
request gets a new client, and the old one is closed once the requests still using it are done.
The owner closes every client at shutdown.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from broker.client_cert import ClientCertificate

__all__ = ["MutualTlsClients"]


@dataclass
class _Client:
    http: httpx.AsyncClient
    version: str  # of the certificate files it was made with
    users: int = 0  # requests in flight on it
    retired: bool = False  # replaced: closed when its last request is done


class MutualTlsClients:
    def __init__(self, make: Callable[[ssl.SSLContext], httpx.AsyncClient]) -> None:
        self._make = make
        self._clients: dict[tuple[str, str | None, str | None], _Client] = {}
        self._retired: list[_Client] = []

    def __len__(self) -> int:
        return len(self._clients)

    @contextlib.asynccontextmanager
    async def client(self, certificate: ClientCertificate) -> AsyncIterator[httpx.AsyncClient]:
        """The HTTP client that presents `certificate`, as its files are now, for one request."""
        version, context = certificate.current()
        entry = self._clients.get(certificate.files)
        replaced = None
        if entry is None or entry.version != version:
            # swapped in before any await: a concurrent request sees the new client, never retires it
            replaced, entry = entry, _Client(self._make(context), version)
            self._clients[certificate.files] = entry
        entry.users += 1
        try:
            if replaced is not None:
                await self._retire(replaced)
            yield entry.http
        finally:
            entry.users -= 1
            if entry.retired and entry.users == 0:
                self._retired.remove(entry)
                await entry.http.aclose()

    async def _retire(self, entry: _Client) -> None:
        if entry.users == 0:
            await entry.http.aclose()
        else:
            entry.retired = True
            self._retired.append(entry)

    async def aclose(self) -> None:
        """Shutdown: close every client, the retired ones still in use too."""
        entries = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        for entry in entries:
            await entry.http.aclose()
