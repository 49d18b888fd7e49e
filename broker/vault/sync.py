"""Keeping every worker's registry current (spec §3.6).

The admin API's credentials and callers live in one document in Redis, sealed like everything
else, with a version beside it. A change is a compare-and-set on that version, announced on the
events channel; pub/sub is lossy, so every worker also checks the version once a second and
catches up by it. A worker that started, or missed events, ends up with the same snapshot.

    admin PUT ─▶ read document + version ─▶ edit, validate ─▶ CAS write ─▶ PUBLISH vault|<v>
                                                                            │
    every worker: on the event, or within a second ─▶ read, validate ─▶ registry.apply(v, entries)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from broker.errors import InvalidRequest, StoreBusy, StoreUnavailable
from broker.reader import Reader
from broker.store import Store
from broker.vault.models import Entries
from broker.vault.registry import Registry
from broker.vault.tables import read_entries

__all__ = ["Document", "VaultSync"]

log = structlog.get_logger("broker.vault")

T = TypeVar("T")
_ATTEMPTS = 8  # concurrent admin writes each retry their edit on the newer document


@dataclass
class Document:
    """The API-managed entries as the admin API took them: `[credentials.*]`-shaped tables
    (secrets as given, sealed with the document) and callers with their key hashes."""

    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    callers: dict[str, dict[str, Any]] = field(default_factory=dict)
    caller_issuers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes | None) -> Document:
        if raw is None:
            return cls()
        data = json.loads(raw)
        return cls(
            credentials=dict(data.get("credentials", {})),
            callers=dict(data.get("callers", {})),
            caller_issuers=dict(data.get("caller_issuers", {})),
        )

    def dumps(self) -> bytes:
        document = {"credentials": self.credentials, "callers": self.callers, "caller_issuers": self.caller_issuers}
        return json.dumps(document, sort_keys=True).encode()

    def entries(self, seed: Entries, env: Mapping[str, str]) -> tuple[Entries, list[str]]:
        """Validated exactly like the config file, against the config file's entries."""
        reader = Reader(env)
        known = {name: {"scopes": list(c.scopes), "grant": c.grant} for name, c in seed.credentials.items()}
        digests = {c.key_sha256: f"callers.{c.name}" for c in seed.callers.values()}
        digests.update({a.key_sha256: f"admins.{a.name}" for a in seed.admins.values()})
        entries = read_entries(
            reader,
            self.credentials,
            self.callers,
            {},
            self.caller_issuers,
            known_credentials=known,
            known_digests=digests,
            known_issuers=seed.caller_issuers,
            known_callers=seed.callers,
        )
        return entries, reader.problems


class VaultSync:
    def __init__(self, store: Store, registry: Registry, env: Mapping[str, str], *, interval: float = 1.0) -> None:
        self.store = store
        self.registry = registry
        self.env = env
        self.interval = interval
        self._wake = asyncio.Event()
        self._warned_version = -1

    def poke(self) -> None:
        """A change was announced: look now rather than at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            with contextlib.suppress(StoreUnavailable, StoreBusy):
                await self.refresh()

    async def refresh(self) -> None:
        """Load the document if its version is not the one the registry holds."""
        if await self.store.vault_version() != self.registry.snapshot.version:
            await self.load()

    async def load(self) -> None:
        version, raw = await self.store.get_vault()
        document = self._document(version, raw)
        if document is None:
            return  # logged; the registry keeps what it has
        entries, problems = document.entries(self.registry.seed, self.env)
        if problems and version != self._warned_version:
            self._warned_version = version
            # e.g. an { env = … } secret this replica does not have: the entry is left out here
            log.warning("vault.entries_skipped", version=version, problems=problems)
        self.registry.apply(version, entries)

    def _document(self, version: int, raw: bytes | None) -> Document | None:
        if raw is None and version > 0:
            if version != self._warned_version:
                self._warned_version = version
                log.error("vault.document_unreadable", version=version, note="it does not open with our keys")
            return None
        try:
            return Document.parse(raw)
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("vault.document_malformed", version=version, reason=type(exc).__name__)  # noqa: TRY400
            return None

    async def change(self, edit: Callable[[Document], T]) -> T:
        """Apply `edit` to the current document and store it (compare-and-set on the version):
        validated like the config file (400 naming the field), applied here at once."""
        for _ in range(_ATTEMPTS):
            version, raw = await self.store.get_vault()
            document = self._document(version, raw)
            if document is None:
                raise StoreUnavailable("The vault document in Redis cannot be read with this broker's keys.")
            _, before = document.entries(self.registry.seed, self.env)
            result = edit(document)
            entries, after = document.entries(self.registry.seed, self.env)
            # Only what this edit brought in: an entry another replica stored with an { env = … }
            # this one lacks is not this request's fault.
            problems = [problem for problem in after if problem not in before]
            if problems:
                raise InvalidRequest("; ".join(problems) + ("" if problems[-1].endswith(".") else "."))
            written = await self.store.put_vault(version, document.dumps())
            if written:
                self.registry.apply(written, entries)
                return result
        raise StoreBusy("The vault changed under this request too often: try again.")
