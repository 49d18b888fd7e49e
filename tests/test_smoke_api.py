from starlette.testclient import TestClient

from tests.conftest import READ, auth, token_body
from tests.support import AuthServerProcess


def test_token_roundtrip_and_cache(client: TestClient, authserver: AuthServerProcess) -> None:
    first = token_body(client.get("/v1/tokens/payments", params={"scope": READ}, headers=auth()))
    second = token_body(client.get("/v1/tokens/payments", params={"scope": READ}, headers=auth()))
    assert first["access_token"] == second["access_token"]
    assert authserver.token_requests() == 1
