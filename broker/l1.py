"""L1: this worker's in-memory copies of L2 entries (spec §4.3).

Served only while the worker's events subscription keeps them current (or Redis is unreachable:
availability wins); the token service decides that, this module only keeps the copies.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from broker.entries import CachedToken

__all__ = ["L1Cache"]

_EVENTS_KEPT = 8  # per key, the latest events remembered to judge a put that raced them


class L1Cache:
    """A bounded LRU dict of this worker's copies of L2 entries.

    A copy read (or written) before an event about its key arrived must not be put afterwards
    (it could be the token just reported): `mark()` before the I/O, `put(…, since=mark)` after.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedToken] = OrderedDict()
        self._events: dict[str, deque[tuple[int, str, str]]] = {}  # key → latest (mark, op, fingerprint)
        self._mark = 0
        self._horizon = 0  # marks older than this can no longer be judged

    def get(self, key: str) -> CachedToken | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: str) -> CachedToken | None:
        return self._entries.get(key)

    def mark(self) -> int:
        return self._mark

    def changed(self, key: str, op: str, fp: str) -> None:
        """An event about `key` arrived."""
        self._mark += 1
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.max_entries:
                self._events.clear()
                self._horizon = self._mark
            events = self._events[key] = deque(maxlen=_EVENTS_KEPT)
        events.append((self._mark, op, fp))

    def _still_current(self, key: str, entry: CachedToken, since: int) -> bool:
        if since < self._horizon:
            return False
        events = self._events.get(key)
        if not events:
            return True
        if len(events) == events.maxlen and events[0][0] > since + 1:
            return False  # some events since `since` were forgotten
        # Not current: a drop, or a write of another token, since the copy was taken.
        return not any(mark > since and (op == "drop" or fp != entry.fingerprint) for mark, op, fp in events)

    def put(self, key: str, entry: CachedToken, since: int | None = None) -> None:
        if since is not None and not self._still_current(key, entry, since):
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def drop_where(self, predicate: Callable[[str], bool]) -> None:
        for key in [key for key in self._entries if predicate(key)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()
        self._events.clear()
        self._mark += 1
        self._horizon = self._mark

    def __len__(self) -> int:
        return len(self._entries)
