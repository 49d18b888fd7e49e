"""A credential's fields (spec §2, §5.1, §6.5, §6.7): read from its table and checked, once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.reader import Reader, check_url, scope_list, to_float, to_str
from broker.secret import Secret
from broker.vault.keyless import KEYLESS_FIELDS, KEYLESS_METHODS, read_keyless
from broker.vault.models import AUTH_METHODS, CredentialSettings

__all__ = ["GRANTS", "MAX_CLIENT_SECRETS", "read_credential"]

MAX_CLIENT_SECRETS = 8
_CREDENTIAL_KEYS = {
    "issuer",
    "token_url",
    "client_id",
    "client_secret",
    "client_secrets",
    "auth_method",
    "scopes",
    "default_scopes",
    "audience",
    "resource",
    "extra_params",
    "grant",
    "return_to_allow",
    "rotation_grace_seconds",
    *KEYLESS_FIELDS,
}
GRANTS = ("client_credentials", "authorization_code")
_RESERVED_FORM_FIELDS = {
    "grant_type",
    "scope",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "audience",
    "resource",
}


def read_credential(r: Reader, name: str, t: Mapping[str, Any]) -> CredentialSettings | None:
    key = f"credentials.{name}"
    r.unknown(t, _CREDENTIAL_KEYS, key)
    token_url = r.value(t, "token_url", f"{key}.token_url", to_str, None, "a URL string")
    issuer = r.value(t, "issuer", f"{key}.issuer", to_str, None, "a URL string")
    if (token_url is None) == (issuer is None):
        r.problem(key, "needs exactly one of issuer (OIDC discovery) or token_url")
    for k, url in (("token_url", token_url), ("issuer", issuer)):
        if url is not None:
            check_url(r, f"{key}.{k}", url)
    client_id = r.value(t, "client_id", f"{key}.client_id", to_str, "", "a string")
    if not client_id:
        r.problem(f"{key}.client_id", "is required")
    auth_method = r.value(t, "auth_method", f"{key}.auth_method", to_str, "client_secret_basic", "a string")
    if auth_method not in AUTH_METHODS:
        r.problem(f"{key}.auth_method", f"must be one of {', '.join(AUTH_METHODS)}, got {auth_method!r}")
    secrets: tuple[Secret, ...] = ()
    if auth_method in KEYLESS_METHODS:
        what = "a private key" if auth_method == "private_key_jwt" else "a TLS client certificate"
        for field_name in ("client_secret", "client_secrets"):
            if field_name in t:
                r.problem(f"{key}.{field_name}", f'is not used with auth_method = "{auth_method}": it uses {what}')
    else:
        secrets = _client_secrets(r, t, key)
    keyless = read_keyless(r, key, t, auth_method, token_url)
    allowed = scope_list(r, t, "scopes", f"{key}.scopes")
    defaults = scope_list(r, t, "default_scopes", f"{key}.default_scopes")
    for scope in defaults:
        if scope not in allowed:
            r.problem(f"{key}.default_scopes", f"scope {scope!r} is not in {key}.scopes")
    extra = r.table(t, "extra_params", f"{key}.extra_params")
    for field_name, v in extra.items():
        if not isinstance(v, str):
            r.problem(f"{key}.extra_params.{field_name}", "must be a string")
        elif field_name in _RESERVED_FORM_FIELDS:
            r.problem(f"{key}.extra_params.{field_name}", "is set by the broker itself")
    grant, return_to_allow, grace = _user_login(r, key, t, issuer)
    if not (secrets or auth_method in KEYLESS_METHODS) or not keyless.usable:
        return None
    return CredentialSettings(
        name=name,
        client_id=client_id,
        client_secrets=secrets,
        token_url=token_url,
        issuer=issuer.rstrip("/") if issuer else None,
        auth_method=auth_method,
        scopes=allowed,
        default_scopes=defaults,
        audience=r.value(t, "audience", f"{key}.audience", to_str, None, "a string"),
        resource=r.value(t, "resource", f"{key}.resource", to_str, None, "a string"),
        extra_params={k: v for k, v in extra.items() if isinstance(v, str)},
        grant=grant,
        return_to_allow=return_to_allow,
        rotation_grace_seconds=grace,
        private_key=keyless.private_key,
        tls_client=keyless.certificate,
    )


def _user_login(r: Reader, key: str, t: Mapping[str, Any], issuer: str | None) -> tuple[str, tuple[str, ...], float]:
    """The authorization code grant's fields (spec §5.1): grant, return_to_allow, rotation grace."""
    grant = r.value(t, "grant", f"{key}.grant", to_str, "client_credentials", "a string")
    if grant not in GRANTS:
        r.problem(f"{key}.grant", f"must be one of {', '.join(GRANTS)}, got {grant!r}")
    code = grant == "authorization_code"
    if code and issuer is None:
        r.problem(f"{key}.issuer", 'is required for grant = "authorization_code" (OIDC discovery, id_token issuer)')
    none: list[str] = []
    allow = r.value(t, "return_to_allow", f"{key}.return_to_allow", _string_list, none, "a list of URL prefixes")
    for prefix in allow:
        check_url(r, f"{key}.return_to_allow", prefix)
    grace = r.value(t, "rotation_grace_seconds", f"{key}.rotation_grace_seconds", to_float, 0.0, "a number")
    if not 0 <= grace <= 3600:
        r.problem(f"{key}.rotation_grace_seconds", f"must be between 0 and 3600, got {grace}")
    for field_name in ("return_to_allow", "rotation_grace_seconds"):
        if field_name in t and not code:
            r.problem(f"{key}.{field_name}", 'is only used with grant = "authorization_code"')
    return grant, tuple(allow), grace


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(value)
    return value


def _client_secrets(r: Reader, t: Mapping[str, Any], key: str) -> tuple[Secret, ...]:
    """`client_secret`, or the `client_secrets` list (rotation): () after a problem."""
    if "client_secrets" not in t:
        secret = r.secret(t, "client_secret", f"{key}.client_secret")
        return (secret,) if secret is not None else ()
    if "client_secret" in t:
        r.problem(key, "needs exactly one of client_secret or client_secrets (a list, while rotating)")
        return ()
    refs, lkey = t["client_secrets"], f"{key}.client_secrets"
    if not isinstance(refs, list):
        r.problem(lkey, 'must be a list of secrets: [{ env = "NEW" }, { env = "OLD" }]')
        return ()
    if not refs or len(refs) > MAX_CLIENT_SECRETS:
        r.problem(lkey, f"must hold 1 to {MAX_CLIENT_SECRETS} secrets, got {len(refs)}")
        return ()
    found: list[tuple[int, Secret]] = []
    for i, ref in enumerate(refs):
        item = f"{lkey}[{i}]"
        secret = r.secret({"s": ref}, "s", item) if ref is not None else None
        if ref is None:
            r.problem(item, 'must be { env = "NAME" }, { file = "/path" } or a string')
        if secret is None:
            continue
        same = next((j for j, earlier in found if earlier == secret), None)
        if same is not None:
            r.problem(item, f"is the same secret as client_secrets[{same}]")
        found.append((i, secret))
    return tuple(secret for _, secret in found) if len(found) == len(refs) else ()
