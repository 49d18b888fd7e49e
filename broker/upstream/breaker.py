"""A per-credential circuit breaker: stop hammering an authorization server that is down.

closed ──N consecutive transient failures──▶ open ──cool-down over──▶ half-open (one probe)
   ▲                                           ▲                          │
   └────────────── probe succeeds ─────────────┴──── probe fails (cool-down doubles) ──┘
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

import structlog

from broker.errors import UpstreamUnavailable
from broker.metrics import breaker_state

__all__ = ["BreakerState", "CircuitBreaker"]

log = structlog.get_logger("broker.upstream")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


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
        self._probing = False
        breaker_state(name, self.state.value)  # a credential shows up as closed from its first request

    def before_request(self) -> None:
        """Raises UpstreamUnavailable (with Retry-After) instead of letting a request through."""
        if self.state is BreakerState.CLOSED:
            return
        now = self.monotonic()
        if self.state is BreakerState.OPEN:
            if now < self._open_until:
                raise self._refusal(self._open_until - now)
            self._set(BreakerState.HALF_OPEN)
            self._probing = False
        if self._probing:
            raise self._refusal(self._cooldown)
        self._probing = True  # this request is the single probe

    def record_success(self) -> None:
        """The server answered (a token, or a refusal that proves it is up)."""
        if self.state is not BreakerState.CLOSED:
            log.info("upstream.breaker_closed", credential=self.name)
            self._set(BreakerState.CLOSED)
        self._consecutive = 0
        self._cooldown = self.base_cooldown
        self._probing = False

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
        self._probing = False
        self._open_until = self.monotonic() + self._cooldown
        log.warning("upstream.breaker_opened", credential=self.name, reason=reason, cooldown=self._cooldown)

    def _refusal(self, retry_after: float) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            "The authorization server is failing; requests to it are paused (circuit open).",
            retry_after=retry_after,
        )
