"""Logging: structlog, JSON off a TTY, and a redaction processor that nothing secret gets past.

Chain (as structlog's default): contextvars → level → exception info → timestamp → redact → render.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

__all__ = ["REDACTED", "configure_logging", "redact", "scrub"]

REDACTED = "[redacted]"

_SENSITIVE_KEY = re.compile(
    r"(secret|password|passwd|authorization|token|assertion|caller_key|api_key|private_key|cookie)",
    re.IGNORECASE,
)
# Keys that contain "token" or "secret" but only name or describe one (fingerprints are HMACs).
_SAFE_KEYS = frozenset({"token_type", "token_url", "token_endpoint", "token_fp", "secret_fp", "fingerprint"})
_SECRET_PATTERNS = re.compile(
    r"(eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*)"  # JWTs
    r"|((?:Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]+)"  # Authorization header values
    r"|(tbk_[A-Za-z0-9_\-]{16,})",  # caller keys
    re.IGNORECASE,
)


def scrub(text: str) -> str:
    """Replace anything in free text that looks like a token, a credential header or a caller key."""
    return _SECRET_PATTERNS.sub(REDACTED, text)


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() not in _SAFE_KEYS and _SENSITIVE_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: masks sensitive keys and secret-looking text in every value."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(key, value)
    return event_dict


def configure_logging(*, json: bool | None = None, level: str = "INFO") -> None:
    """Configure structlog and route stdlib logging (uvicorn, httpx) through the same chain."""
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
