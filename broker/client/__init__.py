"""The Python SDK for callers: an `httpx.Auth` (and a `requests` auth) that puts a broker token on
every request. It imports nothing of the server side, so a caller needs only httpx.

    auth = BrokerAuth("payments", scope="urn:axa.claims.read")   # key from $TOKEN_BROKER_CALLER_KEY
    httpx.Client(auth=auth) · httpx.AsyncClient(auth=auth) · requests.get(url, auth=auth)

One request through it:

    token held in process with more than its margin left? ──yes──▶ send the request with it
        │ no
        ▼
    one broker request per process (a threading lock for sync, an asyncio lock for async;
    concurrent requests wait for it and reuse its token):
    GET {url}/v1/tokens/{credential}?scope=…&min_ttl=<margin>      (broker down → a token still
        │                                                            valid is used meanwhile)
        ▼
    send ──401──▶ POST …/invalidate {access_token, scope}: once per rejected token in the process
                  ──▶ fresh token ──▶ send once more, if the body can be sent again

Margin: max(min_ttl, renew_fraction * the time left when the token arrived), but at most half of
that time, so that a short-lived token is still used for half its life and never refetched on
every request (the broker caps min_ttl the same way).

Errors of the broker, and of reaching it:

BrokerClientError        status (None: no answer), error, error_description, retry_after
├── BrokerRefused        4xx: this caller's request cannot be served as it is (invalid_token,
│                        access_denied, insufficient_scope, invalid_request, rate_limited, …)
└── BrokerUnavailable    5xx, or no answer (error "broker_unreachable"): no token for now;
                         `retry_after` says when to ask again, if the broker said so
"""

from broker.client._answers import BrokerClientError, BrokerRefused, BrokerUnavailable, Token
from broker.client._auth import CALLER_KEY_ENV, DEFAULT_URL, URL_ENV, BrokerAuth

__all__ = [
    "CALLER_KEY_ENV",
    "DEFAULT_URL",
    "URL_ENV",
    "BrokerAuth",
    "BrokerClientError",
    "BrokerRefused",
    "BrokerUnavailable",
    "Token",
]
