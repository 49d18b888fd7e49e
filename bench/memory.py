"""Target 5: memory and scale. RSS of one broker worker holding N distinct cached scope sets.

A real `token-broker serve` (1 worker) with `[cache] l1_max_entries = N` is filled with N
distinct scope sets (subsets of the 16 scopes the bench credential allows), then every one is
asked for again: those answers must all come from L1 (read from the audit trail in the log).
Bytes per entry = RSS growth / entries. Then N/5 more distinct sets are asked for: L1 is an LRU
bounded at N, so RSS must stay about flat.

A second, in-process figure (tracemalloc) counts exactly what one L1 entry and its pre-encoded
fast path response hold, for tokens of the size the live run saw.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.common import CREDENTIAL, SCOPES, Caller, broker, get_token, rss_bytes
from bench.openloop import raw_request


def scope_set(i: int) -> str:
    """The i-th distinct non-empty subset of SCOPES (i >= 1)."""
    return " ".join(s for bit, s in enumerate(SCOPES) if i >> bit & 1)


async def _ask(base: str, caller: Caller, numbers: range, concurrency: int) -> dict[str, Any]:
    from bench.openloop import _Connection

    queue = list(numbers)
    statuses: dict[int, int] = {}

    async def worker() -> None:
        host, port, _ = raw_request(base, {})
        reader, writer = await asyncio.open_connection(host, port)
        connection = _Connection(reader, writer)
        while queue:
            i = queue.pop()
            url = f"{base}/v1/tokens/{CREDENTIAL}?scope={quote(scope_set(i))}"
            status = await connection.request(raw_request(url, caller.headers)[2])
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"statuses": statuses}


def ask(base: str, caller: Caller, numbers: range, concurrency: int = 16) -> dict[int, int]:
    import uvloop

    result: dict[int, int] = uvloop.run(_ask(base, caller, numbers, concurrency))["statuses"]
    return result


def _audit_sources(log: str, since_line: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.splitlines()[since_line:]:
        if '"audit.tokens_handed_out"' not in line:
            continue
        event = json.loads(line)
        counts[event["source"]] = counts.get(event["source"], 0) + event["count"]
    return counts


def _settle_rss(pid: int) -> int:
    time.sleep(1.5)  # the audit flush and any refresh bookkeeping have run
    return rss_bytes(pid)


def run(config_for: Any, caller: Caller, *, entries: int, warm: int = 200) -> dict[str, Any]:
    """`config_for(l1_max_entries)` → config path."""
    config: Path = config_for(entries)
    with broker(config, 1) as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        base = proc.url
        ask(base, caller, range(1, warm + 1))
        rss_start = _settle_rss(pid)
        fill = ask(base, caller, range(warm + 1, entries + 1))
        token_length = len(get_token(f"{base}/v1/tokens/{CREDENTIAL}", caller, scope_set(1))["access_token"])
        time.sleep(1.5)  # the fill's audit events are flushed
        lines_before = len(proc.output().splitlines())
        again = ask(base, caller, range(1, entries + 1))
        rss_full = _settle_rss(pid)
        sources = _audit_sources(proc.output(), lines_before)
        more = entries // 5
        ask(base, caller, range(entries + 1, entries + more + 1))
        ask(base, caller, range(entries + 1, entries + more + 1))
        rss_beyond = _settle_rss(pid)
    grown = rss_full - rss_start
    result: dict[str, Any] = {
        "l1_max_entries": entries,
        "entries": entries,
        "rss_worker_start_bytes": rss_start,
        "rss_worker_full_bytes": rss_full,
        "rss_per_entry_bytes": round(grown / (entries - warm)),
        "second_pass_sources": sources,
        "statuses": {str(k): fill.get(k, 0) + again.get(k, 0) for k in sorted({*fill, *again})},
        "beyond_bound": {"extra_scope_sets": more, "rss_bytes": rss_beyond, "rss_growth_bytes": rss_beyond - rss_full},
    }
    result.update(in_process_bytes_per_entry(entries, token_length))
    result["pass"] = sources == {"l1": entries} and result["beyond_bound"]["rss_growth_bytes"] < grown / 4
    return result


def in_process_bytes_per_entry(entries: int, token_length: int = 900) -> dict[str, Any]:
    """tracemalloc: what N real L1 entries (key, CachedToken, token string) and their pre-encoded
    fast path responses hold."""
    from broker.api.fastpath import FastPath
    from broker.entries import CachedToken, fingerprint
    from broker.l1 import L1Cache
    from broker.store import Keys

    keys = Keys()

    tracemalloc.start()
    l1 = L1Cache(entries)
    before = tracemalloc.get_traced_memory()[0]
    cached: list[CachedToken] = []
    for i in range(1, entries + 1):
        access_token = secrets.token_urlsafe(token_length)[:token_length]
        now = time.monotonic()
        entry = CachedToken(
            access_token=access_token,
            scope=scope_set(i),
            expires_at=time.time() + 3600,
            expires=now + 3600,
            fresh_until=now + 3570,
            refresh_at=now + 2500,
            fetched_at=now,
            fingerprint=fingerprint(access_token),
        )
        l1.put(keys.for_token(CREDENTIAL, "shape", entry.scope).token, entry)
        cached.append(entry)
    after_l1 = tracemalloc.get_traced_memory()[0]
    fast = FastPath(app=None, max_encoded=entries)  # type: ignore[arg-type]
    for entry in cached:
        fast._encode(entry)
    after_fast = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "token_length_chars": token_length,
        "l1_entry_bytes": round((after_l1 - before) / entries),
        "fast_path_encoded_bytes": round((after_fast - after_l1) / entries),
    }
