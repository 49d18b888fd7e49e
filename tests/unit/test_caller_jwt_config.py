"""Config of caller JWTs (spec §6.3): `[caller_issuers.NAME]` and a caller's `jwt_subjects`,
validated like every table, one problem line per bad key."""

from __future__ import annotations

from typing import Any

import pytest

from broker.settings import parse_settings
from broker.vault.models import CALLER_JWT_ALGORITHMS, CallerIssuerSettings, JWTSubject
from tests.unit.test_settings import ENV, HASH_A, READ, config, only_problem, problems

ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER = {"issuer": ISSUER, "audience": "token-broker"}
SUBJECT = "system:serviceaccount:billing:api"


def with_jwts(callers: dict[str, Any], **issuers: Any) -> dict[str, Any]:
    return config(caller_issuers=issuers or {"cluster": CLUSTER}, callers=callers)


def test_a_caller_issuer_and_jwt_subjects_are_read() -> None:
    data = with_jwts(
        {
            "pods": {"jwt_subjects": [SUBJECT, {"issuer": "cluster", "subject": "x"}], "grants": {"payments": [READ]}},
            "both": {"key_sha256": HASH_A, "jwt_subjects": ["y"]},
        },
        cluster={**CLUSTER, "jwks_uri": "https://k8s.internal/openid/v1/jwks", "algorithms": ["ES256", "RS256"]},
    )
    settings = parse_settings(data, ENV)
    assert settings.caller_issuers["cluster"] == CallerIssuerSettings(
        "cluster", ISSUER, "token-broker", "https://k8s.internal/openid/v1/jwks", ("ES256", "RS256")
    )
    pods = settings.callers["pods"]
    assert pods.key_sha256 == ""
    assert pods.jwt_subjects == (JWTSubject(SUBJECT), JWTSubject("x", "cluster"))
    assert settings.callers["both"].key_sha256 == HASH_A


def test_every_asymmetric_algorithm_is_allowed_by_default() -> None:
    issuer = parse_settings(with_jwts({}), ENV).caller_issuers["cluster"]
    assert issuer.algorithms == CALLER_JWT_ALGORITHMS
    assert issuer.jwks_uri is None  # from discovery
    assert not any(a.startswith("HS") or a == "none" for a in CALLER_JWT_ALGORITHMS)


@pytest.mark.parametrize("algorithms", [["HS256"], ["RS256", "none"], ["HS512", "RS256"]])
def test_symmetric_algorithms_and_none_are_refused(algorithms: list[str]) -> None:
    line = only_problem(
        with_jwts({}, cluster={**CLUSTER, "algorithms": algorithms}), "caller_issuers.cluster.algorithms"
    )
    assert "asymmetric only" in line


@pytest.mark.parametrize("algorithms", [[], "RS256", [1]])
def test_algorithms_must_be_a_non_empty_list(algorithms: Any) -> None:
    only_problem(with_jwts({}, cluster={**CLUSTER, "algorithms": algorithms}), "caller_issuers.cluster.algorithms")


@pytest.mark.parametrize("missing", ["issuer", "audience"])
def test_issuer_and_audience_are_required(missing: str) -> None:
    table = {k: v for k, v in CLUSTER.items() if k != missing}
    line = only_problem(with_jwts({}, cluster=table), f"caller_issuers.cluster.{missing}")
    assert "required" in line


def test_urls_are_checked_and_unknown_keys_named() -> None:
    found = problems(with_jwts({}, cluster={**CLUSTER, "issuer": "ftp://x", "jwks_uri": "nope", "leeway": 5}))
    assert sorted(p.split(":")[0] for p in found) == [
        "caller_issuers.cluster.issuer",
        "caller_issuers.cluster.jwks_uri",
        "caller_issuers.cluster.leeway",
    ]


def test_two_caller_issuers_with_one_iss_are_a_problem() -> None:
    line = only_problem(with_jwts({}, a=CLUSTER, b=CLUSTER), "caller_issuers.b.issuer")
    assert "caller_issuers.a" in line


def test_a_caller_needs_a_key_or_subjects() -> None:
    line = only_problem(with_jwts({"nobody": {"grants": {"payments": [READ]}}}), "callers.nobody")
    assert "key_sha256" in line
    assert "jwt_subjects" in line
    only_problem(with_jwts({"nobody": {"jwt_subjects": []}}), "callers.nobody.jwt_subjects")


@pytest.mark.parametrize(
    "subject",
    ["", 7, {"subject": "x"}, {"issuer": "cluster"}, {"issuer": "cluster", "subject": "x", "extra": 1}, "x" * 1025],
)
def test_malformed_subjects_are_named(subject: Any) -> None:
    only_problem(with_jwts({"pods": {"jwt_subjects": [subject]}}), "callers.pods.jwt_subjects[0]")


def test_jwt_subjects_must_be_a_list() -> None:
    only_problem(with_jwts({"pods": {"jwt_subjects": SUBJECT}}), "callers.pods.jwt_subjects")


def test_a_subject_of_an_unknown_issuer_is_a_problem() -> None:
    line = only_problem(
        with_jwts({"pods": {"jwt_subjects": [{"issuer": "elsewhere", "subject": SUBJECT}]}}),
        "callers.pods.jwt_subjects[0]",
    )
    assert "unknown caller issuer 'elsewhere'" in line


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (SUBJECT, SUBJECT),
        (SUBJECT, {"issuer": "cluster", "subject": SUBJECT}),
        ({"issuer": "cluster", "subject": SUBJECT}, SUBJECT),
        ({"issuer": "cluster", "subject": SUBJECT}, {"issuer": "cluster", "subject": SUBJECT}),
    ],
)
def test_a_subject_claimed_by_two_callers_is_a_problem(first: Any, second: Any) -> None:
    line = only_problem(
        with_jwts({"a": {"jwt_subjects": [first]}, "b": {"jwt_subjects": [second]}}), "callers.b.jwt_subjects[0]"
    )
    assert "callers.a" in line


def test_one_subject_from_two_issuers_may_name_two_callers() -> None:
    other = {"issuer": "https://token.actions.githubusercontent.com", "audience": "token-broker"}
    data = with_jwts(
        {
            "a": {"jwt_subjects": [{"issuer": "cluster", "subject": SUBJECT}]},
            "b": {"jwt_subjects": [{"issuer": "other", "subject": SUBJECT}]},
        },
        cluster=CLUSTER,
        other=other,
    )
    assert set(parse_settings(data, ENV).callers) == {"a", "b"}


@pytest.mark.parametrize("url", ["https://[x/oauth", "http://[::1/jwks", "https://a]b/"])
def test_a_url_urllib_cannot_split_is_a_problem_line_not_a_traceback(url: str) -> None:
    """Defect: check_url called urlsplit unguarded, which raises ValueError ("Invalid IPv6 URL")
    for a bracket without its pair: `check-config` and `serve` ended in a traceback, and the
    admin API answered 500 (found by schemathesis on PUT /v1/admin/caller_issuers)."""
    data = with_jwts({}, cluster={**CLUSTER, "jwks_uri": url})
    data["credentials"]["payments"]["token_url"] = url
    found = problems(data)
    assert sorted(p.split(":")[0] for p in found) == [
        "caller_issuers.cluster.jwks_uri",
        "credentials.payments.token_url",
    ]
    assert all("must be an http(s) URL with a host" in p for p in found)


@pytest.mark.parametrize("field", ["issuer", "jwks_uri"])
def test_a_caller_issuer_over_plain_http_to_another_host_is_refused(field: str) -> None:
    """Defect: `http://` was accepted for a caller issuer's URLs, so its discovery document and
    key set, which say who a caller is, could be swapped by anyone on the path (and caller
    identities minted). Plain HTTP is kept for a loopback issuer (a sidecar, tests)."""
    data = with_jwts({}, cluster={**CLUSTER, field: "http://issuer.internal/x"})
    problem = only_problem(data, f"caller_issuers.cluster.{field}")
    assert "must be an https URL (plain http only to a loopback host)" in problem
    for loopback in ("http://127.0.0.1:8443/x", "http://localhost/x", "http://[::1]:80/x"):
        assert parse_settings(with_jwts({}, cluster={**CLUSTER, field: loopback}), ENV).caller_issuers["cluster"]
