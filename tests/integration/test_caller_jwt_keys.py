"""Caller JWTs and the issuers' key sets across real broker processes (spec §6.3): a key the
issuer adds after start is accepted after one refetch, and a flood of unknown `kid`s costs a
bounded number of key set requests, counted at the issuer."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from broker.caller_jwt import REFETCH_INTERVAL_SECONDS
from tests.callerissuer import AUDIENCE, CallerIssuerProcess, Signer, new_key
from tests.conftest import READ, StartBrokers

pytestmark = pytest.mark.slow

SUBJECT = "system:serviceaccount:billing:api"
FLOOD = 500
REFUSED = {"error": "invalid_token", "error_description": "The caller token is not valid."}


@pytest.fixture(scope="module")
def issuers() -> Iterator[CallerIssuerProcess]:
    with CallerIssuerProcess() as process:
        yield process


@pytest.fixture
def cluster(issuers: CallerIssuerProcess) -> Signer:
    issuers.reset()
    signer = Signer(issuers.issuer("cluster"))
    issuers.publish("cluster", signer)
    return signer


@pytest.fixture
def config(write_config: Callable[..., Path], cluster: Signer) -> Path:
    return write_config(
        f"""
        [caller_issuers.cluster]
        issuer = "{cluster.issuer}"
        jwks_uri = "{cluster.issuer}/jwks"
        audience = "{AUDIENCE}"

        [callers.billing-pods]
        jwt_subjects = ["{SUBJECT}"]
        [callers.billing-pods.grants]
        payments = ["{READ}"]
        """
    )


def get(url: str, token: str, client: httpx.Client | None = None) -> httpx.Response:
    params, headers = {"scope": READ}, {"Authorization": f"Bearer {token}"}
    if client is not None:
        return client.get(f"{url}/v1/tokens/payments", params=params, headers=headers)
    return httpx.get(f"{url}/v1/tokens/payments", params=params, headers=headers, timeout=10)


def test_a_key_added_to_the_issuers_key_set_after_start_is_accepted_after_one_refetch(
    start_brokers: StartBrokers, config: Path, cluster: Signer, issuers: CallerIssuerProcess
) -> None:
    (broker,) = start_brokers(config, workers=1)
    assert get(broker.url, cluster.token(SUBJECT)).status_code == 200
    assert issuers.stats("cluster")["jwks"] == 1

    rotated = new_key("RSA")
    cluster.keys.append(rotated)  # the issuer starts signing with a new key, published beside the old
    issuers.publish("cluster", cluster)
    response = get(broker.url, cluster.token(SUBJECT, key=rotated))
    assert response.status_code == 200, response.text
    assert issuers.stats("cluster")["jwks"] == 2
    # both keys work now, without another fetch
    assert get(broker.url, cluster.token(SUBJECT)).status_code == 200
    assert get(broker.url, cluster.token(SUBJECT, key=rotated)).status_code == 200
    assert issuers.stats("cluster")["jwks"] == 2


def test_a_flood_of_unknown_kids_causes_a_bounded_number_of_key_set_requests(
    start_brokers: StartBrokers, config: Path, cluster: Signer, issuers: CallerIssuerProcess
) -> None:
    workers = 2
    (broker,) = start_brokers(config, workers=workers)
    stranger = new_key("EC")  # signs every flood token; each names a kid of its own

    tokens = []
    for _ in range(FLOOD):
        stranger.dict_value["kid"] = uuid.uuid4().hex
        tokens.append(cluster.token(SUBJECT, key=stranger, alg="ES256"))

    started = time.monotonic()
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=16)) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda token: get(broker.url, token, client), tokens))
    elapsed = time.monotonic() - started
    assert all(r.status_code == 401 and r.json() == REFUSED for r in answers)
    fetched = issuers.stats("cluster")["jwks"]
    # per worker: the first fetch, then at most one refetch per interval
    bound = workers * (2 + math.floor(elapsed / REFETCH_INTERVAL_SECONDS))
    print(f"\n{FLOOD} unknown kids in {elapsed:.1f} s on {workers} workers: {fetched} key set requests (bound {bound})")
    assert 1 <= fetched <= bound
    # and the issuer's real keys still work
    assert get(broker.url, cluster.token(SUBJECT)).status_code == 200
