"""A set of `[credentials.*]`, `[callers.*]`, `[admins.*]` and `[caller_issuers.*]` tables read
into Entries: each entry by its fields' module, then what holds across entries (unique key hashes,
issuers, subjects). The config file and the vault document are both read here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.reader import Reader
from broker.vault.caller_fields import read_admin, read_caller, read_caller_issuer
from broker.vault.credential_fields import read_credential
from broker.vault.models import NAME, CallerIssuerSettings, CallerSettings, CredentialSettings, Entries

__all__ = ["read_entries"]


def read_entries(
    r: Reader,
    credentials: Mapping[str, Any],
    callers: Mapping[str, Any],
    admins: Mapping[str, Any],
    caller_issuers: Mapping[str, Any] | None = None,
    *,
    known_credentials: Mapping[str, Mapping[str, Any]] | None = None,
    known_digests: Mapping[str, str] | None = None,
    known_issuers: Mapping[str, CallerIssuerSettings] | None = None,
    known_callers: Mapping[str, CallerSettings] | None = None,
) -> Entries:
    """Read the `[credentials.*]`, `[callers.*]`, `[admins.*]` and `[caller_issuers.*]` tables.
    The known_* arguments are the config file's entries, for the admin API's: raw credential
    tables a caller's grants may also name, key hashes already in use (digest → "callers.NAME"
    or "admins.NAME"), caller issuers a subject may name, callers whose subjects are taken."""
    found_credentials: dict[str, CredentialSettings] = {}
    tables: dict[str, Mapping[str, Any]] = dict(known_credentials or {})
    for name, table in _named_tables(r, credentials, "credentials", "credential"):
        tables[name] = table
        credential = read_credential(r, name, table)
        if credential is not None:
            found_credentials[name] = credential
    found_issuers = {
        name: read_caller_issuer(r, name, table)
        for name, table in _named_tables(r, caller_issuers or {}, "caller_issuers", "caller issuer")
    }
    issuers = {**found_issuers, **(known_issuers or {})}
    _unique_issuers(r, found_issuers, known_issuers or {})
    found_callers = {
        name: read_caller(r, name, table, tables, issuers)
        for name, table in _named_tables(r, callers, "callers", "caller")
    }
    found_admins = {name: read_admin(r, name, table) for name, table in _named_tables(r, admins, "admins", "admin")}
    seen: dict[str, str] = dict(known_digests or {})
    keyed: list[tuple[str, str]] = [(f"callers.{c.name}", c.key_sha256) for c in found_callers.values()]
    keyed += [(f"admins.{a.name}", a.key_sha256) for a in found_admins.values()]
    for owner, digest in keyed:
        if digest and digest in seen:
            r.problem(f"{owner}.key_sha256", f"is the same as {seen[digest]}'s")
        seen.setdefault(digest, owner)
    _unique_subjects(r, found_callers, known_callers or {})
    return Entries(found_credentials, found_callers, found_admins, found_issuers)


def _unique_issuers(
    r: Reader, found: Mapping[str, CallerIssuerSettings], known: Mapping[str, CallerIssuerSettings]
) -> None:
    """One table per `iss`: a token names its issuer, and must find one audience and key set."""
    seen = {issuer.issuer: name for name, issuer in known.items()}
    for name, issuer in found.items():
        other = seen.setdefault(issuer.issuer, name)
        if other != name and issuer.issuer:
            r.problem(f"caller_issuers.{name}.issuer", f"is the same as caller_issuers.{other}'s")


def _unique_subjects(r: Reader, found: Mapping[str, CallerSettings], known: Mapping[str, CallerSettings]) -> None:
    """A subject (from an issuer) identifies one caller: a subject two callers claim is a problem."""
    claimed: dict[str, list[tuple[str | None, str]]] = {}
    for caller in known.values():
        for s in caller.jwt_subjects:
            claimed.setdefault(s.subject, []).append((s.issuer, caller.name))
    for caller in found.values():
        for i, s in enumerate(caller.jwt_subjects):
            owners = claimed.setdefault(s.subject, [])
            for issuer, owner in owners:
                if owner != caller.name and (issuer is None or s.issuer is None or issuer == s.issuer):
                    r.problem(f"callers.{caller.name}.jwt_subjects[{i}]", f"{s.subject!r} is also callers.{owner}'s")
                    break
            owners.append((s.issuer, caller.name))


def _named_tables(r: Reader, tables: Mapping[str, Any], section: str, what: str) -> list[tuple[str, Mapping[str, Any]]]:
    named: list[tuple[str, Mapping[str, Any]]] = []
    for name, table in tables.items():
        if not NAME.fullmatch(name):
            r.problem(f"{section}.{name}", f"a {what} name is 1-64 letters, digits, '.', '_' or '-'")
        elif not isinstance(table, dict):
            r.problem(f"{section}.{name}", "must be a table")
        else:
            named.append((name, table))
    return named
