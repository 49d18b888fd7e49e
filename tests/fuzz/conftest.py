"""Shared by the fuzz modules: one real `token-broker serve` process, and what must hold after it
took the fuzzing."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import redis

from tests.conftest import SECRET_ENV, config_text
from tests.support import CLIENT_SECRET, AuthServerProcess, BrokerProcess

__all__ = ["assert_alive_and_clean", "leaks_in", "live_broker_process"]

# A source file named in an answer, as a traceback or an error message would: a name ending in
# ".py" followed by what ends a name. Not ".py" inside random base64url (a JWT signature segment
# may start with "py": "…J9.py2a…", which made the fuzzers fail one run in a few hundred).
SOURCE_FILE = re.compile(r"\w\.py(?![A-Za-z0-9_-])")


def leaks_in(text: str, leaks: Iterable[str]) -> list[str]:
    """What of `leaks` (literal strings) and of source file names `text` carries."""
    found = [leak for leak in leaks if leak in text]
    found += [match.group() for match in SOURCE_FILE.finditer(text)]
    return found


@contextlib.contextmanager
def live_broker_process(redis_url: str, authserver: AuthServerProcess, directory: Path) -> Iterator[BrokerProcess]:
    """A broker on a flushed Redis and a reset authorization server, stopped on exit."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    authserver.reset()
    path = directory / "broker.toml"
    path.write_text(config_text(redis_url, authserver), encoding="utf-8")
    with BrokerProcess(path, env={SECRET_ENV: CLIENT_SECRET}) as broker:
        yield broker


def assert_alive_and_clean(broker: BrokerProcess) -> None:
    """Still running, still healthy, and nothing in its log says a request blew up."""
    assert broker.proc is not None
    assert broker.proc.poll() is None, "the broker process died"
    assert httpx.get(f"{broker.url}/healthz", timeout=5).status_code == 200
    output = broker.output()
    for sign in ("Traceback", "request.unhandled", "Exception in ASGI application"):
        assert sign not in output, f"the broker logged {sign!r}:\n{output[-4000:]}"
