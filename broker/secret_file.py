"""A secret read from a file, read again when the file changes, without a restart (spec §6.5).

Kubernetes updates a mounted secret by writing a new directory and swapping a symlink (`..data`)
to it, so the file's resolved path, inode, size and times are compared (os.stat follows the
symlinks), at most once a second and only when the value is used: an upstream token request,
never a cache hit. A file that turns empty, unreadable or absent keeps the value read before it,
with one warning per change.
"""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path

import structlog

from broker.secret import Secret

__all__ = ["CHECK_EVERY", "FileSecret", "read_secret_file"]

log = structlog.get_logger("broker.secret")

CHECK_EVERY = 1.0  # seconds between two looks at a secret file


def read_secret_file(path: str) -> str:
    """The secret in a file, stripped. OSError if it cannot be read, ValueError (saying why) if
    it is empty or not UTF-8 text."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    if not value:
        raise ValueError("is empty")
    return value


_Signature = tuple[str, int, int, int, int, int]


def _signature(path: str) -> _Signature:
    """What changes when the file is replaced or rewritten; os.stat follows the symlinks."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileSecret(Secret):
    """A secret read from `path`, read again when the file changes (no restart needed)."""

    __slots__ = ("_checked_at", "_path", "_reported", "_seen", "check_every")

    def __init__(self, path: str, *, check_every: float = CHECK_EVERY) -> None:
        """Reads the file now: OSError, or ValueError (empty, not UTF-8), when it cannot be used."""
        seen = _signature(path)
        super().__init__(read_secret_file(path), f"file:{path}")
        self._path = path
        self._seen = seen
        self._reported: _Signature | str | None = None  # the bad state last warned about
        self._checked_at = time.monotonic()
        self.check_every = check_every

    def reveal(self) -> str:
        now = time.monotonic()
        if now - self._checked_at >= self.check_every:
            self._checked_at = now
            self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            seen = _signature(self._path)
        except OSError as exc:
            self._keep(exc.strerror or type(exc).__name__, f"stat: {exc.errno}")
            return
        if seen == self._seen:
            return
        try:
            value = read_secret_file(self._path)
        except ValueError as exc:
            self._keep(f"the file {exc}", seen)
            return
        except OSError as exc:
            self._keep(exc.strerror or type(exc).__name__, seen)
            return
        self._seen, self._reported = seen, None
        if not hmac.compare_digest(value.encode(), self._value.encode()):
            self._value = value
            log.info("secret.file_changed", source=self.source, note="the new value is used from now on")

    def _keep(self, reason: str, state: _Signature | str) -> None:
        """The file cannot be used now: keep the last good value, and say so once per change."""
        if state != self._reported:
            self._reported = state
            log.warning("secret.file_unusable", source=self.source, reason=reason, note="keeping the value read before")
