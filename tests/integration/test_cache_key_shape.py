"""The cache key names the token's shape and the deployment, not just the credential (spec §4.1).

Brokers sharing one Redis never hand out each other's tokens when anything that shapes a token
differs (client id, endpoint, auth method, audience, resource, extra params), e.g. during a
rolling deploy that changes one of them; and two deployments that share a Redis and credential
names stay apart with `[redis] key_prefix`, while brokers of one deployment share.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import READ, SECRET_ENV, StartBrokers, auth, config_text
from tests.support import CLIENT_ID, WEIRD_CLIENT_ID, WEIRD_CLIENT_SECRET, AuthServerProcess, BrokerProcess

pytestmark = pytest.mark.slow

TOKENS = "/v1/tokens/payments"
WEIRD_SECRET_ENV = "TB_TEST_WEIRD_CLIENT_SECRET"
PAYMENTS_CLIENT = f'client_id = "{CLIENT_ID}"\nclient_secret = {{ env = "{SECRET_ENV}" }}\n'


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def jti(token: str) -> str:
    """A token's unique id: short in a failure message."""
    return str(claims(token)["jti"])


def token_of(broker: BrokerProcess) -> str:
    response = httpx.get(broker.url + TOKENS, params={"scope": READ}, headers=auth(), timeout=15, trust_env=False)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def invalidate(broker: BrokerProcess, token: str) -> None:
    response = httpx.post(
        f"{broker.url}{TOKENS}/invalidate",
        json={"access_token": token, "scope": READ},
        headers=auth(),
        timeout=15,
        trust_env=False,
    )
    assert response.status_code == 204, response.text


@pytest.fixture
def config_with(tmp_path: Path, redis_url: str, authserver: AuthServerProcess) -> Callable[..., Path]:
    """config_with(name, payments_client=None, payments_extra="", by_discovery=False) → a config
    file whose `payments` credential has another client block, extra keys, or finds its token
    endpoint through the issuer's discovery document instead of `token_url`."""

    def write(
        name: str, payments_client: str | None = None, payments_extra: str = "", by_discovery: bool = False
    ) -> Path:
        text = config_text(redis_url, authserver)
        assert text.count(PAYMENTS_CLIENT) == 2, "config_text changed shape: update this test"
        text = text.replace(PAYMENTS_CLIENT, (payments_client or PAYMENTS_CLIENT) + payments_extra, 1)
        if by_discovery:
            endpoint = f'token_url = "{authserver.token_url}"'
            assert text.count(endpoint) == 1, "config_text changed shape: update this test"
            text = text.replace(endpoint, f'issuer = "{authserver.url}"')
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


WEIRD_CLIENT = f'client_id = "{WEIRD_CLIENT_ID}"\nclient_secret = {{ env = "{WEIRD_SECRET_ENV}" }}\n'

Check = Callable[[dict[str, Any], dict[str, Any]], bool]  # (token claims, upstream request) → the new config's?
CHANGES: dict[str, tuple[dict[str, Any], Check]] = {
    "client_id": ({"payments_client": WEIRD_CLIENT}, lambda jwt, request: jwt["client_id"] == WEIRD_CLIENT_ID),
    "audience": ({"payments_extra": 'audience = "other-api"\n'}, lambda jwt, request: jwt["aud"] == "other-api"),
    "auth_method": (
        {"payments_extra": 'auth_method = "client_secret_post"\n'},
        lambda jwt, request: request["auth"] == "post",
    ),
    "resource": (
        {"payments_extra": 'resource = "https://api.example/"\n'},
        lambda jwt, request: request["form"].get("resource") == "https://api.example/",
    ),
    "extra_params": (
        {"payments_extra": 'extra_params = { tenant = "blue" }\n'},
        lambda jwt, request: request["form"].get("tenant") == "blue",
    ),
    "issuer": ({"by_discovery": True}, lambda jwt, request: True),  # same endpoint, found another way
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_credential_fetches_its_own_token_from_a_shared_redis(
    config_with: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers, change: str
) -> None:
    """Defect (hardening item 7): keys were `tb:{name}:…`, so a rolling deploy that changed a
    token-shaping field of a credential (client_id, audience, auth_method, resource, extra_params,
    issuer instead of token_url) served
    the old pod's token from Redis, minted for the old config, with zero upstream calls."""
    changed, is_new_config = CHANGES[change]
    (old_pod,) = start_brokers(config_with("old.toml"), workers=1)
    old_token = token_of(old_pod)
    assert authserver.token_requests() == 1

    env = {WEIRD_SECRET_ENV: WEIRD_CLIENT_SECRET}
    (new_pod,) = start_brokers(config_with("new.toml", **changed), workers=1, env=env)
    new_token = token_of(new_pod)
    assert jti(new_token) != jti(old_token), "the new pod handed out the old config's token"
    assert authserver.token_requests() == 2
    assert is_new_config(claims(new_token), authserver.stats()["requests"][-1])
    assert claims(old_token)["client_id"] == CLIENT_ID

    # both are cached, side by side
    assert (jti(token_of(old_pod)), jti(token_of(new_pod))) == (jti(old_token), jti(new_token))
    assert authserver.token_requests() == 2


def test_deployments_with_their_own_key_prefix_keep_their_own_tokens_and_invalidations(
    config_with: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Defect (hardening item 7): two deployments sharing a Redis and a credential name served each
    other's tokens; `[redis] key_prefix` keeps them apart: their own token each, and a token
    reported to one deployment is not dropped from the other's cache (nor from its L1)."""
    config = config_with("same.toml")
    (blue,) = start_brokers(config, workers=1, env={"BROKER_REDIS_KEY_PREFIX": "blue"})
    (green,) = start_brokers(config, workers=1, env={"BROKER_REDIS_KEY_PREFIX": "green"})
    blue_token, green_token = token_of(blue), token_of(green)
    assert jti(blue_token) != jti(green_token), "green handed out blue's token"
    assert authserver.token_requests() == 2

    invalidate(blue, green_token)  # green's token reported to blue: not blue's, a no-op
    assert jti(token_of(green)) == jti(green_token)
    assert jti(token_of(blue)) == jti(blue_token)
    assert authserver.token_requests() == 2

    invalidate(blue, blue_token)  # blue replaces its own token; green keeps its own
    assert jti(token_of(blue)) != jti(blue_token)
    assert jti(token_of(green)) == jti(green_token), "an invalidation in blue dropped green's token"
    assert authserver.token_requests() == 3


def test_brokers_of_one_deployment_share_their_tokens(
    config_with: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers
) -> None:
    """Hardening item 7, the other side: the same key_prefix and the same credential config share
    one cache entry across replicas (one upstream request for both)."""
    config = config_with("same.toml")
    first, second = start_brokers(config, count=2, workers=1, env={"BROKER_REDIS_KEY_PREFIX": "blue"})
    assert jti(token_of(first)) == jti(token_of(second))
    assert authserver.token_requests() == 1
