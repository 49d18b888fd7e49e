"""A per-credential circuit breaker: stop hammering an authorization server that is down.

closed ──N consecutive transient failures──▶ open ──cool-down over──▶ half-open (one probe)
   ▲                                           ▲                          │
   └────────────── probe answered ─────────────┴──── probe fails (cool-down doubles) ──┘

Every request goes through `admit()` and runs inside the Attempt it returns, which settles the
outcome whatever happens: a transient failure (UpstreamUnavailable) counts against the server;
any other answer (a token, a refusal, a malformed answer) proves it is up and closes the circuit;
anything else (the request cancelled, a bug) says nothing about the server, so the probe slot is
given back unchanged and the next request probes instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from types import TracebackType

import structlog

from broker.errors import UpstreamError, UpstreamUnavailable
from broker.metrics import breaker_state

__all__ = ["Attempt", "BreakerState", "CircuitBreaker"]

log = structlog.get_logger("broker.upstream")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Attempt:
    """One admitted request: `with attempt:` around it records its outcome on the breaker."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.breaker.record_success()
        elif isinstance(exc, UpstreamUnavailable):
            self.breaker.record_failure()
        elif isinstance(exc, UpstreamError):
            self.breaker.record_success()  # refused or malformed: it answered, so it is up (spec §4.7)
        else:
            self.breaker.give_back(self)


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int,
        cooldown: float,
        max_cooldown: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failures = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.monotonic = monotonic
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._cooldown = cooldown
        self._open_until = 0.0
        self._probe: Attempt | None = None  # the one request let through while half-open
        breaker_state(name, self.state.value)  # a credential shows up as closed from its first request

    def admit(self) -> Attempt:
        """An Attempt to run one request in, or UpstreamUnavailable (with Retry-After) while open.

        Nothing may be awaited between admit() and entering the Attempt, or a probe slot could leak.
        """
        if self.state is BreakerState.CLOSED:
            return Attempt(self)
        now = self.monotonic()
        if self.state is BreakerState.OPEN:
            if now < self._open_until:
                raise self._refusal(self._open_until - now)
            self._set(BreakerState.HALF_OPEN)
            self._probe = None
        if self._probe is not None:
            raise self._refusal(self._cooldown)
        self._probe = Attempt(self)  # this request is the single probe
        return self._probe

    def give_back(self, attempt: Attempt) -> None:
        """An attempt ended without telling anything about the server: if it was the probe, the
        next request probes instead (the state stays as it is)."""
        if self._probe is attempt:
            self._probe = None

    def record_success(self) -> None:
        """The server answered (a token, a refusal or a malformed answer: it is up)."""
        if self.state is not BreakerState.CLOSED:
            log.info("upstream.breaker_closed", credential=self.name)
            self._set(BreakerState.CLOSED)
        self._consecutive = 0
        self._cooldown = self.base_cooldown
        self._probe = None

    def record_failure(self) -> None:
        """A transient failure: connect error, timeout, 429 or 5xx."""
        self._consecutive += 1
        if self.state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open(reason="probe failed")
        elif self.state is BreakerState.CLOSED and self._consecutive >= self.failures:
            self._open(reason=f"{self._consecutive} consecutive failures")

    def _set(self, state: BreakerState) -> None:
        self.state = state
        breaker_state(self.name, state.value)

    def _open(self, reason: str) -> None:
        self._set(BreakerState.OPEN)
        self._probe = None
        self._open_until = self.monotonic() + self._cooldown
        log.warning("upstream.breaker_opened", credential=self.name, reason=reason, cooldown=self._cooldown)

    def _refusal(self, retry_after: float) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            "The authorization server is failing; requests to it are paused (circuit open).",
            retry_after=retry_after,
        )
