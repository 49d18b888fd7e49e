"""Reading typed values out of config tables (TOML, or the admin API's JSON), one problem line
per bad key, in the same words wherever a table comes from (spec §2, §3.6)."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from broker import scopes as scopes_mod
from broker.errors import InvalidRequest
from broker.secret import Secret
from broker.secret_file import FileSecret

__all__ = ["Reader", "check_url", "scope_list", "to_bool", "to_float", "to_int", "to_pair", "to_str"]

T = TypeVar("T")


class Reader:
    """Reads typed values out of TOML tables, collecting one problem line per bad key."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def table(self, parent: Mapping[str, Any], name: str, key: str) -> dict[str, Any]:
        value = parent.get(name, {})
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], known: set[str], prefix: str) -> None:
        for name in sorted(set(table) - known):
            self.problem(f"{prefix}.{name}", "unknown key")

    def value(
        self,
        table: Mapping[str, Any],
        name: str,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        expected: str,
    ) -> T:
        if name not in table:
            return default
        try:
            return convert(table[name])
        except (TypeError, ValueError, OverflowError):
            self.problem(key, f"must be {expected}, got {table[name]!r}")
            return default

    def secret(self, table: Mapping[str, Any], name: str, key: str) -> Secret | None:
        ref = table.get(name)
        if ref is None:
            self.problem(key, "is required")
            return None
        if isinstance(ref, str):
            if not ref:
                self.problem(key, "must not be empty")
                return None
            self.warnings.append(
                f'{key}: a literal secret in the config file; prefer {{ env = "…" }} or {{ file = "…" }}'
            )
            return Secret(ref, "literal")
        if not isinstance(ref, dict) or len(ref) != 1 or next(iter(ref)) not in ("env", "file"):
            self.problem(key, 'must be { env = "NAME" }, { file = "/path" } or a string')
            return None
        kind, where = next(iter(ref.items()))
        if not isinstance(where, str) or not where:
            self.problem(key, f"{kind} must be a non-empty string")
            return None
        if kind == "env":
            env_value = self.env.get(where)
            if not env_value:
                self.problem(key, f"environment variable {where} is not set or empty")
                return None
            return Secret(env_value, f"env:{where}")
        try:
            return FileSecret(where)
        except OSError as exc:
            self.problem(key, f"cannot read secret file {where}: {exc.strerror or exc}")
        except ValueError as exc:
            self.problem(key, f"secret file {where} {exc}")
        return None


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(value)


def to_int(value: Any) -> int:
    if isinstance(value, bool | float):
        raise TypeError(value)
    return int(value)


def to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(value)
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(value)
    return result


def to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def to_pair(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(value)
    low, high = (to_float(v) for v in value)
    return (low, high)


def check_url(reader: Reader, key: str, url: str, *, https: str | None = None) -> None:
    """An http(s) URL with a host. With `https` (why it matters), plain HTTP only to a loopback
    host: what travels there must not be readable or changeable on the way."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. "Invalid IPv6 URL": a bracket without its pair
        usable = False
    if not usable:
        reader.problem(key, f"must be an http(s) URL with a host, got {url!r}")
    elif key.endswith("issuer") and (parts.query or parts.fragment):
        reader.problem(key, "must not carry a query or fragment")
    elif https is not None and parts.scheme == "http" and not _loopback(parts.hostname or ""):
        reader.problem(key, f"must be an https URL (plain http only to a loopback host): {https}")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def scope_list(reader: Reader, table: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
    raw = table.get(name, [])
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        reader.problem(key, "must be a list of strings")
        return ()
    try:
        return scopes_mod.parse(" ".join(raw))
    except InvalidRequest as exc:
        reader.problem(key, exc.description)
        return ()
