"""/metrics adds up every worker's numbers, with bounded labels."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import CALLER_KEYS, READ, WRITE, auth
from tests.integration.workers import pin_connections
from tests.support import AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow


def _sample(page: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in page.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1 :] == wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_add_up_all_workers(write_config: Callable[..., Path], authserver: AuthServerProcess) -> None:
    with BrokerProcess(write_config(), workers=2) as broker:
        async with contextlib.AsyncExitStack() as stack:
            pinned = await pin_connections(broker, per_worker=1, stack=stack)
            assert len(pinned) == 2
            for clients in pinned.values():
                for _ in range(10):
                    response = await clients[0].get(
                        f"{broker.url}/v1/tokens/payments", params={"scope": READ}, headers=auth()
                    )
                    assert response.status_code == 200
        denied = httpx.get(f"{broker.url}/v1/tokens/payments", params={"scope": "urn:nope"}, headers=auth())
        assert denied.status_code == 403
        authserver.configure(fault="invalid_scope")
        rejected = httpx.get(f"{broker.url}/v1/tokens/payments", params={"scope": WRITE}, headers=auth())
        assert rejected.status_code == 502
        await asyncio.sleep(1.5)  # every worker folds its hit counters into the metrics at least once a second
        page = httpx.get(f"{broker.url}/metrics").text

    served = sum(
        _sample(page, "token_broker_token_requests_total", credential="payments", outcome=outcome)
        for outcome in ("l1", "l2", "fetched", "coalesced")
    )
    assert served == 20  # 10 per worker, whichever worker answered /metrics
    assert _sample(page, "token_broker_token_requests_total", credential="payments", outcome="rejected") == 1
    assert _sample(page, "token_broker_upstream_requests_total", credential="payments", status="200") == 1
    assert _sample(page, "token_broker_upstream_requests_total", credential="payments", status="400") == 1
    assert _sample(page, "token_broker_breaker_state", credential="payments") == 0
    assert "token_broker_upstream_request_duration_seconds_bucket" in page
    # Bounded labels: no scope strings, no caller keys, no tokens.
    assert READ not in page
    assert "urn:nope" not in page
    assert all(key not in page for key in CALLER_KEYS.values())
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}", page)
