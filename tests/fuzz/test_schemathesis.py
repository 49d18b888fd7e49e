"""Schemathesis: openapi.yaml against a live broker process (real Redis, the real test
authorization server), every operation, positive and negative cases, and a stateful run
along the document's links (get a token, then report it as rejected).

Checks: no server error, status code / content type / headers / body schema as documented,
405 with `Allow` for undocumented methods, schema-valid requests accepted and schema-invalid
ones rejected, and the error contract of spec §3.3 (JSON body with `error` and
`error_description`, nothing internal or secret) on every 4xx/5xx answer.

Run with `-s` to see the number of cases.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.conftest import ADMIN, ADMIN_KEY, CALLER_KEYS, READ, WRITE
from tests.fuzz.conftest import assert_alive_and_clean, leaks_in, live_broker_process
from tests.support import CLIENT_SECRET, REPO_ROOT, AuthServerProcess, BrokerProcess

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "max-examples": 150, "deterministic": True, "database": "none"},
        "auth": {"openapi": {"callerKey": {"bearer": CALLER_KEYS["billing"]}, "adminKey": {"bearer": ADMIN_KEY}}},
        # Most cases should get past the grant check (403 access_denied for any other name).
        "dictionaries": {
            "credentials": {"values": ["payments", "ledger"]},
            "scopes": {"values": [READ, WRITE, ADMIN, f"{READ} {WRITE}", f" {WRITE}\t{READ} {READ} ", ""]},
        },
        "parameters": {
            "path.credential": {"dictionary": "credentials", "probability": 0.7},
            "query.scope": {"dictionary": "scopes", "probability": 0.5},
            "body.scope": {"dictionary": "scopes", "probability": 0.5},
        },
    }
)
schema = schemathesis.openapi.from_path(REPO_ROOT / "broker" / "openapi.yaml", config=CONFIG)

ERROR_CODES = {
    "invalid_request",
    "invalid_token",
    "access_denied",
    "insufficient_scope",
    "rate_limited",
    "upstream_rejected",
    "upstream_invalid_response",
    "upstream_unavailable",
    "not_found",
    "method_not_allowed",
    "read_only",
    "temporarily_unavailable",
}
# Nothing internal or secret in any answer: tracebacks, source paths, the upstream client
# secret, any caller key (the one presented included).
LEAKS = ("Traceback", 'File "', "/work/", "broker/", CLIENT_SECRET, ADMIN_KEY, *CALLER_KEYS.values())
STATS: Counter[str] = Counter()


def error_contract(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Spec §3.3: every 4xx/5xx is a JSON error body; no answer carries anything internal or secret."""
    STATS[f"status:{response.status_code}"] += 1
    head = "".join(f"{name}: {', '.join(values)}\n" for name, values in response.headers.items())
    text = response.content.decode("utf-8", "replace") if response.content else ""
    assert not leaks_in(head, LEAKS), f"response headers carry {leaks_in(head, LEAKS)}"
    if case.operation.path != "/openapi.yaml":  # the document itself names files and paths
        assert not leaks_in(text, LEAKS), f"response body carries {leaks_in(text, LEAKS)}"
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        if case.operation.path == "/v1/oauth/callback" and content_type.startswith("text/html"):
            return None  # a person's browser gets a page (asked for JSON, it gets the error body)
        assert content_type.split(";")[0].strip() == "application/json", content_type
        body = json.loads(text)
        assert isinstance(body, dict), body
        assert body.get("error") in ERROR_CODES, body
        assert isinstance(body.get("error_description"), str), body
        assert body["error_description"].strip(), body
    if response.status_code == 401:
        assert response.headers.get("www-authenticate"), "401 without WWW-Authenticate"
    if response.status_code == 503 and case.operation.path.startswith("/v1/"):
        assert response.headers.get("retry-after"), "503 without Retry-After"
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,
    allow_header_conformance,
    positive_data_acceptance,
    negative_data_rejection,
    error_contract,
]


@pytest.fixture(scope="module")
def live_broker(
    redis_server: str, authserver_session: AuthServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """One `token-broker serve` process for the whole module; checked alive and clean at the end."""
    with live_broker_process(redis_server, authserver_session, tmp_path_factory.mktemp("schemathesis")) as broker:
        yield broker
        cases = sum(count for key, count in STATS.items() if key.startswith(("op:", "step:")))
        print(f"\nschemathesis: {cases} cases, server errors: {STATS['server_errors']}")
        for key, count in sorted(STATS.items()):
            print(f"  {key}: {count}")
        assert_alive_and_clean(broker)


def _count(response: schemathesis.Response) -> None:
    if response.status_code >= 500:
        STATS["server_errors"] += 1


# A schema-valid credential table may still break a rule of the config file that a JSON schema
# cannot state (default_scopes within scopes, exactly one of issuer and token_url, a reachable
# { env = … }; an issuer's URL with a host, one table per `iss`): the admin API answers those 400
# in the config loader's words, as it must. So does the login callback for a state that no login
# started.
SEMANTIC_VALIDATION = {
    "PUT /v1/admin/credentials/{name}",
    "PUT /v1/admin/callers/{name}",
    "PUT /v1/admin/caller_issuers/{name}",
    "GET /v1/oauth/callback",  # a schema-valid state is still one nobody started: 400
}


@schema.parametrize()
def test_every_operation_conforms(case: schemathesis.Case, live_broker: BrokerProcess) -> None:
    STATS[f"op:{case.operation.label}"] += 1
    response = case.call(base_url=live_broker.url, timeout=15)
    _count(response)
    checks = CHECKS
    if case.operation.label in SEMANTIC_VALIDATION and response.status_code == 400:
        checks = [check for check in CHECKS if check is not positive_data_acceptance]
    case.validate_response(response, checks=checks)


def test_stateful_token_then_invalidate(live_broker: BrokerProcess) -> None:
    """Along the links: a token from GET, then POST invalidate with that token and its scope."""

    class Workflow(schema.include(path_regex="^/v1/tokens/").as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": live_broker.url, "timeout": 15}

        def after_call(self, response: schemathesis.Response, case: schemathesis.Case) -> None:
            STATS[f"step:{case.operation.label}"] += 1
            _count(response)

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, *args: Any, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=hypothesis.settings(
            max_examples=40,
            stateful_step_count=6,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
    assert STATS["step:POST /v1/tokens/{credential}/invalidate"] > 0
