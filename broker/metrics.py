"""Prometheus metrics (spec §7.3), correct with several uvicorn workers.

`token-broker serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers
start, so prometheus-client keeps every worker's values in files that `/metrics` (answered by any
worker) adds up. The hit path never touches them: it bumps plain dict counters in `Stats`, which
each worker folds into the metrics at least once a second (and right before it renders /metrics).

Label values are bounded: configured credential and caller names (or "-"), outcomes, HTTP status
codes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["CONTENT_TYPE_LATEST", "Stats", "breaker_state", "client_secret_in_use", "observe_upstream", "render"]

_NS = "token_broker"

TOKEN_REQUESTS = Counter(
    f"{_NS}_token_requests", "Token requests by credential and outcome.", ["credential", "outcome"]
)
HANDOUT_TTL_SUM = Counter(
    f"{_NS}_token_handout_ttl_seconds",
    "Seconds of life left on tokens handed out (divide by token_requests for the average).",
    ["credential"],
)
HANDOUT_TTL_MIN = Gauge(
    f"{_NS}_token_handout_ttl_min_seconds",
    "Least life left on a token handed out during the last flush interval.",
    ["credential"],
    multiprocess_mode="livemin",
)
FACADE_REQUESTS = Counter(
    f"{_NS}_facade_requests",
    "Token requests through the OAuth token-endpoint facade, by credential and outcome (also in token_requests).",
    ["credential", "outcome"],
)
UPSTREAM_REQUESTS = Counter(
    f"{_NS}_upstream_requests", "Token requests sent to authorization servers, by answer.", ["credential", "status"]
)
UPSTREAM_LATENCY = Histogram(
    f"{_NS}_upstream_request_duration_seconds",
    "Time for one token request to an authorization server.",
    ["credential"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SINGLEFLIGHT_WAITERS = Gauge(
    f"{_NS}_singleflight_waiters",
    "Requests waiting for a token fetch already under way.",
    multiprocess_mode="livesum",
)
BREAKER_STATE = Gauge(
    f"{_NS}_breaker_state",
    "Circuit breaker per credential: 0 closed, 1 half-open, 2 open (worst worker).",
    ["credential"],
    multiprocess_mode="livemax",
)
CLIENT_SECRET_FALLBACK = Gauge(
    f"{_NS}_client_secret_fallback",
    "Which of a credential's client_secrets the last token request used: 0 the first; above 0 a"
    " fallback is in use, so the rotation is not finished (credentials with several only).",
    ["credential"],
    multiprocess_mode="livemostrecent",  # the latest any worker learnt, not a stale one's
)
RATE_LIMITED = Counter(
    f"{_NS}_rate_limited_requests", "Token requests refused 429 because the caller was over its rate limit.", ["caller"]
)
CACHE_ENTRIES = Gauge(
    f"{_NS}_cache_entries", "Tokens held in the per-worker L1 caches.", ["level"], multiprocess_mode="livesum"
)

_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class Stats:
    """What one worker handed out since the last flush: plain dicts, cheap on the hot path."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    facade_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # the share of `counts` via the facade
    ttl_sum: dict[str, float] = field(default_factory=dict)
    ttl_min: dict[str, float] = field(default_factory=dict)
    waiters: int = 0
    limited: dict[str, int] = field(default_factory=dict)  # caller → requests refused 429

    def handout(self, credential: str, outcome: str, ttl: float, *, facade: bool = False) -> None:
        key = (credential, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        if facade:
            self.facade_counts[key] = self.facade_counts.get(key, 0) + 1
        self.ttl_sum[credential] = self.ttl_sum.get(credential, 0.0) + ttl
        least = self.ttl_min.get(credential)
        if least is None or ttl < least:
            self.ttl_min[credential] = ttl

    def refused(self, credential: str, outcome: str, *, facade: bool = False) -> None:
        key = (credential, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        if facade:
            self.facade_counts[key] = self.facade_counts.get(key, 0) + 1

    def rate_limited(self, caller: str) -> None:
        self.limited[caller] = self.limited.get(caller, 0) + 1

    def flush(self, l1_entries: int) -> None:
        counts, self.counts = self.counts, {}
        facade_counts, self.facade_counts = self.facade_counts, {}
        limited, self.limited = self.limited, {}
        ttl_sum, self.ttl_sum = self.ttl_sum, {}
        ttl_min, self.ttl_min = self.ttl_min, {}
        for (credential, outcome), n in counts.items():
            TOKEN_REQUESTS.labels(credential, outcome).inc(n)
        for (credential, outcome), n in facade_counts.items():
            FACADE_REQUESTS.labels(credential, outcome).inc(n)
        for caller, n in limited.items():
            RATE_LIMITED.labels(caller).inc(n)
        for credential, seconds in ttl_sum.items():
            HANDOUT_TTL_SUM.labels(credential).inc(seconds)
        for credential, seconds in ttl_min.items():
            HANDOUT_TTL_MIN.labels(credential).set(seconds)
        SINGLEFLIGHT_WAITERS.set(self.waiters)
        CACHE_ENTRIES.labels("l1").set(l1_entries)


def observe_upstream(credential: str, status: str, seconds: float) -> None:
    UPSTREAM_REQUESTS.labels(credential, status).inc()
    UPSTREAM_LATENCY.labels(credential).observe(seconds)


def client_secret_in_use(credential: str, index: int) -> None:
    CLIENT_SECRET_FALLBACK.labels(credential).set(index)


def breaker_state(credential: str, state: str) -> None:
    BREAKER_STATE.labels(credential).set(_BREAKER_VALUES[state])


def render() -> bytes:
    """The metrics page: all workers' values in multiprocess mode, this process's otherwise."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def worker_exit() -> None:
    """Drop this worker's live gauges from the aggregate (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
