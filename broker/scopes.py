"""Scope sets: the canonical form of a requested scope string (spec §1)."""

from __future__ import annotations

import re

from broker.errors import InvalidScope

__all__ = ["MAX_SCOPES", "MAX_SCOPE_LENGTH", "canonical", "parse"]

# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_SEPARATORS = re.compile(r"[ \t\r\n]+")  # ASCII whitespace only: anything else is a bad character
MAX_SCOPES = 64
MAX_SCOPE_LENGTH = 256


def parse(raw: str) -> tuple[str, ...]:
    """Split on whitespace, check each scope token, de-duplicate and sort.

    Raises InvalidScope (an InvalidRequest) for characters RFC 6749 does not allow or oversized input.
    """
    if len(raw) > MAX_SCOPES * (MAX_SCOPE_LENGTH + 1):
        raise InvalidScope("The scope parameter is too long.")
    tokens = _SEPARATORS.split(raw.strip(" \t\r\n"))
    if tokens == [""]:
        tokens = []
    for token in tokens:
        if len(token) > MAX_SCOPE_LENGTH:
            raise InvalidScope(f"A scope is longer than {MAX_SCOPE_LENGTH} characters.")
        if not _SCOPE_TOKEN.fullmatch(token):
            raise InvalidScope("The scope parameter contains characters that RFC 6749 does not allow in a scope.")
    unique = tuple(sorted(set(tokens)))
    if len(unique) > MAX_SCOPES:
        raise InvalidScope(f"At most {MAX_SCOPES} scopes may be requested at once.")
    return unique


def canonical(scopes: tuple[str, ...] | list[str]) -> str:
    """The scope set as one string: de-duplicated, sorted, joined with one space."""
    return " ".join(sorted(set(scopes)))
