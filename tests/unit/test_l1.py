"""L1Cache: a put is checked against the events that arrived since its read (hardening item 9)."""

from __future__ import annotations

from broker.entries import CachedToken, fingerprint
from broker.l1 import _EVENTS_KEPT, L1Cache

KEY, OTHER_KEY = "tb:{payments}:tok:a", "tb:{payments}:tok:b"


def token(name: str) -> CachedToken:
    return CachedToken(name, "s", 0.0, 100.0, 90.0, 60.0, 0.0, fingerprint(name), fence=1)


def test_a_put_with_no_events_since_is_kept() -> None:
    l1 = L1Cache(10)
    since = l1.mark()
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) == token("t")


def test_the_echo_of_its_own_write_does_not_block_the_put() -> None:
    """The "set" event of the very token being put (this worker's own write, or the write it read)."""
    l1 = L1Cache(10)
    since = l1.mark()
    l1.changed(KEY, "set", fingerprint("t"))
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) == token("t")


def test_a_drop_of_that_token_since_the_read_blocks_the_put() -> None:
    """Defect (hardening item 9): the token read from Redis was put into L1 after the "drop" event
    for it had arrived, and was served again from L1."""
    l1 = L1Cache(10)
    since = l1.mark()
    l1.changed(KEY, "drop", fingerprint("t"))
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) is None


def test_a_drop_under_another_fingerprint_blocks_the_put_too() -> None:
    """During a key rotation the same token has fingerprints under different keys: any drop of
    the key since the read counts."""
    l1 = L1Cache(10)
    since = l1.mark()
    l1.changed(KEY, "drop", fingerprint("t-under-the-old-key"))
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) is None


def test_a_write_of_another_token_since_the_read_blocks_the_put() -> None:
    l1 = L1Cache(10)
    since = l1.mark()
    l1.changed(KEY, "set", fingerprint("newer"))
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) is None


def test_events_before_the_read_and_on_other_keys_do_not_matter() -> None:
    l1 = L1Cache(10)
    l1.changed(KEY, "drop", fingerprint("t"))  # before the read began
    since = l1.mark()
    l1.changed(OTHER_KEY, "drop", fingerprint("t"))
    l1.changed(OTHER_KEY, "set", fingerprint("x"))
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) == token("t")


def test_an_overflowed_event_history_is_conservative() -> None:
    """More events on the key than it remembers since the read: some may have been a drop."""
    l1 = L1Cache(10)
    since = l1.mark()
    for _ in range(_EVENTS_KEPT + 1):
        l1.changed(KEY, "set", fingerprint("t"))  # harmless ones, but the oldest are forgotten
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) is None
    # a read that began after them is judged on what is remembered
    since = l1.mark()
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) == token("t")


def test_forgotten_keys_make_older_reads_unjudgeable() -> None:
    """Events of more keys than L1 holds: the history is cleared and reads from before are refused."""
    l1 = L1Cache(3)
    since = l1.mark()
    for i in range(4):
        l1.changed(f"tb:{{payments}}:tok:{i}", "set", fingerprint("x"))
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) is None


def test_a_clear_refuses_puts_from_reads_before_it() -> None:
    """L1 is cleared when the subscription comes back: events may have been missed."""
    l1 = L1Cache(10)
    since = l1.mark()
    l1.clear()
    l1.put(KEY, token("t"), since)
    assert l1.peek(KEY) is None


def test_a_put_without_since_is_unconditional_and_the_cache_is_bounded() -> None:
    l1 = L1Cache(2)
    l1.changed(KEY, "drop", fingerprint("t"))
    for name in ("a", "b", "t"):
        l1.put(f"k-{name}", token(name))
    assert len(l1) == 2
    assert l1.peek("k-a") is None
