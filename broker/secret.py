"""Secret values: a type whose repr and str never show the value.

Imports nothing beyond the standard library: the callers' SDK (broker/client) uses it too. A
secret read from a file, and read again when the file changes, is broker/secret_file.py.
"""

from __future__ import annotations

import hmac

__all__ = ["Secret"]


class Secret:
    """A secret string (client secret, private key). `reveal()` is the only way to read it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "literal") -> None:
        self._value = value
        self.source = source  # where it came from, e.g. "env:PAYMENTS_SECRET"; safe to show

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('**********', source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self.reveal().encode(), other.reveal().encode())

    def __hash__(self) -> int:
        return hash(self.source)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self  # immutable: copies of settings share it, and it never goes through pickle

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("Secret values are not picklable")
