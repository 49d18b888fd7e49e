"""The per-credential circuit breaker on its own (spec §4.7): how each outcome of an attempt moves
it, and that the half-open probe is settled whatever the attempt ends in (hardening issue item 3).
tests/fault/test_upstream_exchange.py shows the same through a real broker process."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import UpstreamInvalidResponse, UpstreamRejected, UpstreamUnavailable
from broker.upstream.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(failures: int = 2, cooldown: float = 1.0) -> tuple[CircuitBreaker, Clock]:
    """A breaker opened by `failures` transient failures, its cool-down just over: half-open next."""
    clock = Clock()
    breaker = CircuitBreaker("payments", failures=failures, cooldown=cooldown, monotonic=clock)
    for _ in range(failures):
        with pytest.raises(UpstreamUnavailable), breaker.admit():
            raise UpstreamUnavailable("down")
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(UpstreamUnavailable, match="circuit open"):
        breaker.admit()
    clock.now += cooldown
    return breaker, clock


def test_transient_failures_open_it_and_a_successful_probe_closes_it() -> None:
    breaker, _ = opened()
    with breaker.admit():
        assert breaker.state is BreakerState.HALF_OPEN
        with pytest.raises(UpstreamUnavailable, match="circuit open"):
            breaker.admit()  # one probe at a time
    assert breaker.state is BreakerState.CLOSED


def test_a_failed_probe_opens_it_again_for_twice_as_long() -> None:
    breaker, clock = opened(cooldown=1.0)
    with pytest.raises(UpstreamUnavailable), breaker.admit():
        raise UpstreamUnavailable("still down")
    assert breaker.state is BreakerState.OPEN
    clock.now += 1.5
    with pytest.raises(UpstreamUnavailable, match="circuit open"):
        breaker.admit()
    clock.now += 0.5
    with breaker.admit():
        pass
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "answer",
    [
        UpstreamRejected("no", upstream_error="invalid_client", upstream_status=401),
        UpstreamInvalidResponse("not JSON"),
    ],
    ids=["rejected", "invalid"],
)
def test_a_probe_that_gets_a_refusal_or_a_malformed_answer_closes_it(answer: Exception) -> None:
    """The server answered: it is up. Callers then get the 502 that says what is wrong with the
    answer, not a 503 "circuit open" that hides it (and malformed answers never open it)."""
    breaker, _ = opened()
    with pytest.raises(type(answer)), breaker.admit():
        raise answer
    assert breaker.state is BreakerState.CLOSED
    for _ in range(5):
        with pytest.raises(UpstreamInvalidResponse), breaker.admit():
            raise UpstreamInvalidResponse("not JSON")
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("ending", [RuntimeError("bug"), asyncio.CancelledError()], ids=["exception", "cancelled"])
def test_a_probe_that_ends_in_anything_else_gives_its_slot_back(ending: BaseException) -> None:
    """Defect: the probe slot was given back only by record_success/record_failure, so a probe
    that ended otherwise left every later request refused as "circuit open", for ever."""
    breaker, _ = opened()
    with pytest.raises(type(ending)), breaker.admit():
        raise ending
    assert breaker.state is BreakerState.HALF_OPEN  # nothing was learnt about the server
    with breaker.admit():  # the next request is the probe
        pass
    assert breaker.state is BreakerState.CLOSED


def test_an_older_attempt_cancelled_late_does_not_free_the_probe_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker("payments", failures=1, cooldown=1.0, monotonic=clock)
    slow = breaker.admit()  # closed: a request that takes long
    with pytest.raises(UpstreamUnavailable), breaker.admit():
        raise UpstreamUnavailable("down")  # another one fails: open
    clock.now += 1.0
    probe = breaker.admit()
    with pytest.raises(asyncio.CancelledError), slow:
        raise asyncio.CancelledError  # the old request ends now: it was not the probe
    with pytest.raises(UpstreamUnavailable, match="circuit open"):
        breaker.admit()  # still one probe at a time
    with probe:
        pass
    assert breaker.state is BreakerState.CLOSED
