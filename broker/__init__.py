"""token-broker: OAuth 2.0 client credentials held centrally, ready access tokens for callers.

The package surface is small on purpose: the app factory, the settings loader and the errors.
The app factory and the settings are imported on first use, so that `import broker.client` (the
SDK of callers) loads neither Redis nor Starlette.
"""

import typing

from broker.errors import (
    AccessDenied,
    BrokerError,
    ConfigError,
    InsufficientScope,
    InvalidCallerToken,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamRejected,
    UpstreamUnavailable,
)

if typing.TYPE_CHECKING:
    from broker.api import create_app
    from broker.settings import Settings, load_settings

__all__ = [
    "AccessDenied",
    "BrokerError",
    "ConfigError",
    "InsufficientScope",
    "InvalidCallerToken",
    "InvalidRequest",
    "RateLimited",
    "Settings",
    "UpstreamError",
    "UpstreamInvalidResponse",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "create_app",
    "load_settings",
]


_LAZY = ("Settings", "create_app", "load_settings")


def __getattr__(name: str) -> typing.Any:
    # Imported on first use: the app pulls in prometheus_client, which must not be imported before
    # `token-broker serve` has pointed PROMETHEUS_MULTIPROC_DIR at its directory; the settings pull
    # in redis, which callers using only broker.client do not need.
    if name == "create_app":
        from broker.api import create_app  # noqa: PLC0415

        return create_app
    if name in {"Settings", "load_settings"}:
        from broker import settings  # noqa: PLC0415

        return getattr(settings, name)
    raise AttributeError(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
