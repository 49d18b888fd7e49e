"""Tampering with what is stored (spec §6.1): whoever can write to Redis cannot make a broker hand
out a token it did not fetch, nor make it fail. A value copied to another key, an edited cleartext
field of its header (window, deadline, fence, fingerprint), a value under an unknown key id, a flipped byte
of the ciphertext, a plaintext value planted while encryption is on, a tampered or planted
refusal: each is a miss that refetches (one more upstream request, 200), never a 500, and the
broker logs `vault.undecryptable_value` once per key id, not once per value.

Broker A writes; broker B (one worker, so nothing of it is in any L1) reads what A left, after
the test changed it behind both brokers' backs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from broker.callers import hash_key, new_caller_key
from broker.store import Keys
from broker.vault.keyring import KeyRing
from tests.conftest import StartBrokers, admin_auth
from tests.leakwatch import add_secret
from tests.support import CLIENT_ID, AuthServerProcess, BrokerProcess, stored_token, token_keys

pytestmark = pytest.mark.slow

PROBER_KEY = new_caller_key()
add_secret("caller key", PROBER_KEY)
SCOPES = [f"urn:test:p{n}" for n in range(16)]


def extra_config(authserver: AuthServerProcess) -> str:
    scopes = json.dumps(SCOPES)
    return f"""
[credentials.probe]
token_url = "{authserver.token_url}"
client_id = "{CLIENT_ID}"
client_secret = {{ env = "TB_TEST_CLIENT_SECRET" }}
scopes = {scopes}

[callers.prober]
key_sha256 = "{hash_key(PROBER_KEY)}"
[callers.prober.grants]
probe = {scopes}
"""


def get(broker: BrokerProcess, scope: str) -> httpx.Response:
    return httpx.get(
        f"{broker.url}/v1/tokens/probe",
        params={"scope": scope},
        headers={"Authorization": f"Bearer {PROBER_KEY}"},
        timeout=10,
        trust_env=False,
    )


def token(broker: BrokerProcess, scope: str) -> str:
    response = get(broker, scope)
    assert response.status_code == 200, response.text
    access_token: str = response.json()["access_token"]
    return access_token


def flip(text: str, at: int) -> str:
    """One base64 character changed: still base64, no longer the ciphertext."""
    return text[:at] + ("B" if text[at] == "A" else "A") + text[at + 1 :]


def test_tampered_values_are_misses_that_refetch_never_errors(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers, redis_url: str
) -> None:
    config = write_config(extra_config(authserver))
    writer, reader = start_brokers(config, count=2, workers=1)
    direct = redis.Redis.from_url(redis_url)
    kid = KeyRing.parse(os.environ["BROKER_ENCRYPTION_KEYS"]).primary

    def key(scope: str, kind: str = "token") -> str:
        name: str = getattr(token_keys(config, "probe", scope), kind)
        return name

    def stored(scope: str) -> str:
        raw = direct.get(key(scope))
        assert raw is not None, scope
        return raw.decode()

    def tamper(scope: str, value: str | bytes, kind: str = "token") -> None:
        assert direct.set(key(scope, kind), value, keepttl=True)

    # Refusals first: they are remembered for negative_ttl_seconds (5 s) only.
    authserver.configure(fault="invalid_scope", fault_count=1)
    assert get(writer, "urn:test:p14").status_code == 502  # remembered, in Redis for every broker
    authserver.configure(fault="invalid_scope", fault_count=1)
    assert get(writer, "urn:test:p15").status_code == 502
    refusal = direct.get(key("urn:test:p14", "refusal"))
    assert refusal is not None
    assert refusal.startswith(b"v3|")
    version, deadline, body = refusal.decode().split("|", 2)
    tamper("urn:test:p14", f"{version}|{deadline}|{flip(body, len(body) // 2)}", "refusal")
    planted = json.dumps({"d": "planted refusal", "e": "invalid_client", "s": 401})
    until = int(time.time() * 1000) + 3_600_000
    tamper("urn:test:p13", f"v2|{until}|{planted}", "refusal")  # planted where nothing was refused
    before = authserver.token_requests()
    assert get(reader, "urn:test:p15").status_code == 502  # the control: an intact refusal answers
    assert authserver.token_requests() == before
    outcomes: dict[str, tuple[int, int]] = {}
    for case, scope in (("tampered refusal", "urn:test:p14"), ("planted plaintext refusal", "urn:test:p13")):
        before = authserver.token_requests()
        response = get(reader, scope)
        outcomes[case] = (response.status_code, authserver.token_requests() - before)

    # Tokens: the writer fetches one per scope set, then the test changes what it stored.
    originals = {scope: token(writer, scope) for scope in SCOPES[:10]}
    p = SCOPES
    head = {scope: stored(scope).split("|", 5) for scope in originals}  # version, fence, fp, window, deadline, sealed
    tamper(p[1], stored(p[2]))  # a ciphertext copied to another key (the scope set p2's onto p1's)
    version, fence, fp, window, deadline, sealed = head[p[3]]
    tamper(p[3], "|".join([version, fence, fp, str(int(window) * 2), deadline, sealed]))  # a longer window
    version, fence, fp, window, deadline, sealed = head[p[4]]
    tamper(p[4], "|".join([version, str(int(fence) + 1000), fp, window, deadline, sealed]))  # a later fence
    version, fence, fp, window, deadline, sealed = head[p[5]]
    tamper(p[5], "|".join([version, fence, head[p[0]][2], window, deadline, sealed]))  # another token's fingerprint
    version, fence, fp, window, deadline, sealed = head[p[6]]
    tamper(p[6], "|".join([version, fence, fp, window, deadline, "zz." + sealed.split(".", 1)[1]]))  # an unknown key id
    version, fence, fp, window, deadline, sealed = head[p[7]]
    tamper(p[7], "|".join([version, fence, fp, window, deadline, flip(sealed, len(sealed) // 2)]))  # a flipped byte
    version, fence, fp, window, deadline, sealed = head[p[8]]
    payload = json.dumps({"t": "planted-token", "s": p[8], "l": 3_600_000, "r": 3_000_000, "e": 4_000_000_000.0})
    tamper(p[8], "|".join(["v2", fence, fp, window, deadline, payload]))  # plaintext, while encryption is on
    version, fence, fp, window, deadline, sealed = head[p[9]]
    tamper(p[9], "|".join([version, fence, fp, window, str(int(deadline) + 3_600_000), sealed]))  # a later end

    before = authserver.token_requests()
    assert token(reader, p[0]) == originals[p[0]]  # the control: an intact value is a hit
    assert authserver.token_requests() == before
    served: dict[str, str] = {}
    cases = {
        "copied from another key": p[1],
        "window edited": p[3],
        "fence edited": p[4],
        "fingerprint edited": p[5],
        "unknown key id": p[6],
        "ciphertext byte flipped": p[7],
        "plaintext planted": p[8],
        "deadline edited": p[9],
    }
    for case, scope in cases.items():
        before = authserver.token_requests()
        response = get(reader, scope)
        outcomes[case] = (response.status_code, authserver.token_requests() - before)
        if response.status_code == 200:
            served[case] = response.json()["access_token"]
    assert outcomes == dict.fromkeys(outcomes, (200, 1)), outcomes
    assert "planted-token" not in served.values()
    assert not set(served.values()) & set(originals.values())

    # Each refetched token replaced the tampered value: stored, readable, and served as a hit.
    for case, scope in cases.items():
        entry = stored_token(redis_url, token_keys(config, "probe", scope))
        assert entry is not None, case
        assert entry.access_token == served[case], case
    before = authserver.token_requests()
    for case, scope in cases.items():
        assert token(writer, scope) == served[case], case
    assert authserver.token_requests() == before

    reader.stop()
    lines = [json.loads(line) for line in reader.output().splitlines() if line.startswith("{")]
    warned = [line["kid"] for line in lines if line.get("event") == "vault.undecryptable_value"]
    assert sorted(warned) == sorted([kid, "zz"]), warned  # once per key id, though six values failed
    assert not [line for line in lines if line.get("event") == "request.unhandled" or line.get("status") == 500]
    direct.close()


@pytest.mark.parametrize("fence", ["9" * 30, "1" + "0" * 14], ids=["30 digits", "10^14"])
def test_an_edited_fence_is_a_miss_like_any_other_edit(
    fence: str,
    write_config: Callable[..., Path],
    authserver: AuthServerProcess,
    start_brokers: StartBrokers,
    redis_url: str,
) -> None:
    """Defect: the Lua scripts read the cleartext fence of a stored value as a number, and wrote
    fences with Lua's %.14g. A fence edited to 30 digits made the lock script compute one Redis
    cannot return as an integer: the broker took its own lock for someone else's and waited it
    out, left the counter at "1e+30" (every later lock for the key failed for the counter's 24 h:
    no single-flight across processes), and its write was refused while the tampered value lived,
    so every request that missed L1 fetched upstream. A fence edited to 10^14 made the lock value
    "owner|1e+14": the holder could neither renew nor release it."""
    config = write_config(extra_config(authserver))
    writer, reader = start_brokers(config, count=2, workers=1)
    keys = token_keys(config, "probe", "urn:test:p9")
    original = token(writer, "urn:test:p9")
    with redis.Redis.from_url(redis_url) as direct:
        version, _, fp, window, deadline, sealed = direct.get(keys.token).decode().split("|", 5)
        assert direct.set(keys.token, "|".join([version, fence, fp, window, deadline, sealed]), keepttl=True)

        before = authserver.token_requests()
        refetched = token(reader, "urn:test:p9")
        assert refetched != original
        assert authserver.token_requests() == before + 1
        entry = stored_token(redis_url, keys)
        assert entry is not None, "the refetched token was not stored"
        assert entry.access_token == refetched
        counter = direct.get(keys.fence)
        assert counter is not None
        assert counter.isdigit(), counter
        assert not direct.exists(keys.lock), f"the fetch lock was left behind: {direct.get(keys.lock)!r}"
    # and it is shared as usual: the writer's L1 copy was replaced by the reader's event
    assert token(writer, "urn:test:p9") == refetched
    assert authserver.token_requests() == before + 1


@pytest.mark.parametrize("version", ["garbage", "9" * 30], ids=["not a number", "30 digits"])
def test_an_edited_vault_version_stops_no_admin_change_no_sync_and_no_start(
    version: str, write_config: Callable[..., Path], start_brokers: StartBrokers, redis_url: str
) -> None:
    """Defect: the vault's version (cleartext beside the sealed document) was read with int():
    once edited to something else, every admin change answered 500, a broker starting meanwhile
    failed its startup, and a running broker's vault sync died, so it never applied another
    change."""
    config = write_config()
    (running,) = start_brokers(config, count=1, workers=1)

    def new_caller(broker: BrokerProcess, name: str) -> dict[str, str]:
        body = {"grants": {"payments": ["urn:test:claims.read"]}}
        response = httpx.put(f"{broker.url}/v1/admin/callers/{name}", json=body, headers=admin_auth(), timeout=10)
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['caller_key']}"}

    def serves(broker: BrokerProcess, headers: dict[str, str]) -> bool:
        for _ in range(60):  # a change is applied within a second
            if httpx.get(f"{broker.url}/v1/tokens/payments", headers=headers, timeout=10).status_code == 200:
                return True
            time.sleep(0.05)
        return False

    first = new_caller(running, "before")
    with redis.Redis.from_url(redis_url) as direct:
        direct.set(Keys().vault_version, version)
    time.sleep(1.5)  # the running broker's version check has seen it
    second = new_caller(running, "after")
    (started,) = start_brokers(config, count=1, workers=1)
    assert serves(started, first)
    assert serves(started, second)
    third = new_caller(started, "later")
    assert serves(running, third), "the running broker no longer applies changes"
    assert "Traceback" not in running.output() + started.output()


def test_a_tampered_vault_document_keeps_what_brokers_have_and_answers_no_500(
    write_config: Callable[..., Path], start_brokers: StartBrokers, redis_url: str
) -> None:
    """The vault document flipped by one byte: it does not open, so nothing of it is trusted. A
    running broker keeps the entries it has (an API caller still gets tokens) and logs
    `vault.document_unreadable` once; an admin change is refused with 503, not a 500."""
    (broker,) = start_brokers(write_config(), count=1, workers=1)
    body = {"grants": {"payments": ["urn:test:claims.read"]}}
    created = httpx.put(f"{broker.url}/v1/admin/callers/shipping", json=body, headers=admin_auth(), timeout=10)
    assert created.status_code == 201, created.text
    caller = {"Authorization": f"Bearer {created.json()['caller_key']}"}
    with redis.Redis.from_url(redis_url) as direct:
        document = direct.get(Keys().vault_document).decode()
        version, sealed = document.split("|", 1)
        direct.set(Keys().vault_document, f"{version}|{flip(sealed, len(sealed) // 2)}")
        direct.incr(Keys().vault_version)  # as a writer would: every broker reads it again
    time.sleep(1.5)
    assert httpx.get(f"{broker.url}/v1/tokens/payments", headers=caller, timeout=10).status_code == 200
    refused = httpx.put(f"{broker.url}/v1/admin/callers/other", json=body, headers=admin_auth(), timeout=10)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "temporarily_unavailable"
    output = broker.output()
    assert output.count('"vault.document_unreadable"') == 1
    assert "Traceback" not in output


def test_a_longer_ttl_on_a_stored_token_does_not_lengthen_its_life(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers, redis_url: str
) -> None:
    """Defect: a copy read from Redis was bounded by its key's PTTL alone, which is not part of
    the sealed value: whoever can write to Redis could PEXPIRE a token's key (an edited expiry),
    and a broker then told callers `expires_in` of that TTL and handed the token out long after
    it had expired."""
    config = write_config(extra_config(authserver))
    writer, reader = start_brokers(config, count=2, workers=1)
    authserver.configure(lifetime=3)
    expiring = token(writer, "urn:test:p11")
    fetched_at = time.monotonic()
    authserver.configure(lifetime=3600)
    lasting = get(writer, "urn:test:p10").json()
    with redis.Redis.from_url(redis_url) as direct:
        for scope in ("urn:test:p10", "urn:test:p11"):
            assert direct.pexpire(token_keys(config, "probe", scope).token, 100 * 3600 * 1000)

    before = authserver.token_requests()
    same = get(reader, "urn:test:p10").json()
    assert same["access_token"] == lasting["access_token"]  # still a hit: the value is intact
    assert same["expires_in"] <= lasting["expires_in"], same
    time.sleep(max(0.0, fetched_at + 3.5 - time.monotonic()))  # the 3 s token has expired
    assert token(reader, "urn:test:p11") != expiring
    assert authserver.token_requests() == before + 1


def test_a_longer_ttl_on_a_remembered_refusal_does_not_lengthen_it(
    write_config: Callable[..., Path], authserver: AuthServerProcess, start_brokers: StartBrokers, redis_url: str
) -> None:
    """Defect: a remembered refusal lasted as long as its key's TTL, which is not part of the
    sealed value: a PEXPIRE on it made every broker answer `upstream_rejected` from it, without
    asking the authorization server again, for as long as whoever wrote to Redis liked."""
    config = write_config(extra_config(authserver))
    env = {"BROKER_CACHE_NEGATIVE_TTL_SECONDS": "1"}
    writer, reader = start_brokers(config, count=2, workers=1, env=env)
    authserver.configure(fault="invalid_scope", fault_count=1)
    assert get(writer, "urn:test:p12").status_code == 502
    refused_at = time.monotonic()
    with redis.Redis.from_url(redis_url) as direct:
        assert direct.pexpire(token_keys(config, "probe", "urn:test:p12").refusal, 3600 * 1000)
    time.sleep(max(0.0, refused_at + 1.5 - time.monotonic()))  # the refusal was remembered for 1 s
    before = authserver.token_requests()
    response = get(reader, "urn:test:p12")
    assert response.status_code == 200, response.text
    assert authserver.token_requests() == before + 1
