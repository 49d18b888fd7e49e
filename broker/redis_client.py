"""Redis connections for every topology the broker supports (spec §2, §7.4).

`[redis] url` picks the topology by its scheme:

- `redis://host:6379/0`, `rediss://…` (TLS), `unix:///path/redis.sock?db=0`: one server;
- `redis+sentinel://[[user]:password@]host1:26379,host2:26379/<service>[/db]` (`rediss+sentinel://`):
  the master that the sentinels name, followed across failovers;
- `redis+cluster://[[user]:password@]host1:7000,host2:7001` (`rediss+cluster://`): a Redis Cluster,
  discovered from any of the nodes given.

The password in the URL is the data nodes' one; sentinels that want a password of their own get it
from the query (`?sentinel_password=…`). `tls_ca_file`, `tls_cert_file` and `tls_key_file` apply to
every TLS connection (data nodes and sentinels). A URL is only ever logged through `redact_url`.

Every topology keeps the behaviour of the standalone client: a burst of commands waits (up to
`pool_timeout`) for a connection instead of failing, a server slower than the socket timeouts is
treated as down, and every TCP connection has keepalive on. The Store only ever touches one key
per command or script, and every key is hash-tagged by credential (`tb:{credential}:…`), so
nothing here needs cross-slot support.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url as _redis_py_parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "CLUSTER_SCHEMES",
    "SCHEMES",
    "SENTINEL_SCHEMES",
    "STANDALONE_SCHEMES",
    "PoolExhausted",
    "RedisTarget",
    "RedisURLError",
    "connect",
    "parse_url",
    "redact_url",
]

log = structlog.get_logger("broker.redis")

Kind = Literal["standalone", "sentinel", "cluster"]

STANDALONE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = STANDALONE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES

_DEFAULT_PORT = {"sentinel": 26379, "cluster": 6379}

# The standalone client's settings, kept for every topology.
MAX_CONNECTIONS = 256
POOL_TIMEOUT = 2.0  # how long a command waits for a free connection before counting as a failure
SOCKET_CONNECT_TIMEOUT = 1.0  # a cache slower than this is treated as down: callers are served without it
SOCKET_TIMEOUT = 1.0
HEALTH_CHECK_INTERVAL = 10
# TCP keepalive on every TCP connection: a connection idle for KEEPALIVE_IDLE seconds is probed
# by the kernel, so a peer that vanished without a FIN or RST is noticed within
# KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES = 25 s even with nothing in flight, and
# middleboxes that forget idle flows (NAT, load balancers, firewalls: minutes) see traffic. The
# events subscription has a heartbeat of its own (broker/events.py): this is its second line, and
# the first for pooled command connections between uses.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_PROBES = 3


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced, for logs and reprs."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if parts.query:
        query = [(k, "***" if k.lower().endswith("password") else v) for k, v in parse_qsl(parts.query, True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


class PoolExhausted(RedisConnectionError):
    """Every connection stayed busy for longer than the pool waits: load, not an outage."""


class _BlockingPool(aioredis.BlockingConnectionPool):
    """The blocking pool, telling "no connection free in time" apart from "Redis is down"."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, TimeoutError) and not isinstance(exc, PoolExhausted):
                raise PoolExhausted("No connection available.") from exc
            raise


class RedisURLError(ValueError):
    """`[redis] url` is not one of the accepted forms; the message says what is wrong."""


@dataclass(frozen=True)
class RedisTarget:
    """What a `[redis] url` names. Secrets stay out of repr."""

    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seed nodes (empty for standalone)
    service: str | None = None  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if not item:
        raise RedisURLError("has an empty host in its host list")
    if item.startswith("["):  # [ipv6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RedisURLError(f"has a malformed IPv6 host {item!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise RedisURLError(f"has an empty host in {item!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisURLError(f"has an invalid port in {item!r}")
    return host, int(port_text)


def parse_url(url: str) -> RedisTarget:
    """Validate `url` and say which topology it names; RedisURLError with a readable reason."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ in an IPv6 host
        raise RedisURLError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        forms = ", ".join(f"{s}://" for s in SCHEMES)
        got = f"{parts.scheme}://" if parts.scheme else "no scheme"  # never the rest: it may hold a password
        raise RedisURLError(f"must start with one of {forms}; got {got!r}")
    tls = scheme.startswith("rediss")
    if scheme in STANDALONE_SCHEMES:
        if scheme != "unix" and not parts.hostname:
            raise RedisURLError("must name a host, e.g. redis://redis:6379/0")
        if scheme == "unix" and not parts.path:
            raise RedisURLError("must name a socket path, e.g. unix:///run/redis.sock")
        try:
            kwargs = _redis_py_parse_url(url)
        except ValueError as exc:
            raise RedisURLError(f"is not a valid Redis URL ({exc})") from None
        return RedisTarget(
            kind="standalone",
            tls=tls,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
        )

    kind: Kind = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    nodes = tuple(_host_port(item.strip(), _DEFAULT_PORT[kind]) for item in hostlist.split(","))
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    segments = [unquote(s) for s in parts.path.split("/") if s]
    db = 0
    service = None
    if kind == "sentinel":
        if not segments:
            raise RedisURLError(f"must name the master after the hosts: {scheme}://host:26379/<service_name>[/db]")
        if len(segments) > 2:
            raise RedisURLError(f"has too many path parts; expected {scheme}://hosts/<service_name>[/db]")
        service = segments[0]
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise RedisURLError(f"has a database number that is not a number: {segments[1]!r}")
            db = int(segments[1])
        unknown = set(query) - {"sentinel_password"}
    else:
        if segments not in ([], ["0"]):
            raise RedisURLError("must not name a database other than 0: Redis Cluster has only one")
        unknown = set(query)
    if unknown:
        raise RedisURLError(f"has unknown query parameter(s): {', '.join(sorted(unknown))}")
    return RedisTarget(
        kind=kind,
        tls=tls,
        nodes=nodes,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password") or None,
    )


def _tls_kwargs(ca_file: str | None, cert_file: str | None, key_file: str | None) -> dict[str, Any]:
    # Verification is never turned off: a server whose certificate does not chain to the CA (or to
    # the system's CAs without tls_ca_file) or does not match the host name is unreachable.
    return {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": ca_file,
        "ssl_certfile": cert_file,
        "ssl_keyfile": key_file,
    }


_TIMEOUTS: dict[str, Any] = {
    "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
    "socket_timeout": SOCKET_TIMEOUT,
}


def _keepalive_options() -> dict[int, int]:
    """The options this platform has (Linux all three; macOS names the idle time TCP_KEEPALIVE)."""
    wanted = (
        (("TCP_KEEPIDLE", "TCP_KEEPALIVE"), KEEPALIVE_IDLE),
        (("TCP_KEEPINTVL",), KEEPALIVE_INTERVAL),
        (("TCP_KEEPCNT",), KEEPALIVE_PROBES),
    )
    options: dict[int, int] = {}
    for names, value in wanted:
        option = next((getattr(socket, name) for name in names if hasattr(socket, name)), None)
        if option is not None:
            options[option] = value
    return options


# For TCP connections only: a unix-socket connection takes no keepalive arguments.
_KEEPALIVE: dict[str, Any] = {"socket_keepalive": True, "socket_keepalive_options": _keepalive_options()}


def connect(
    url: str,
    *,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> aioredis.Redis:
    """A client for the topology `url` names. Nothing is connected until the first command.

    For a cluster the result is a RedisCluster: it offers the commands, scripts and pub/sub the
    Store and the EventSubscriber use, under the same names.
    """
    target = parse_url(url)
    tls = _tls_kwargs(tls_ca_file, tls_cert_file, tls_key_file) if target.tls else {}
    log.info(
        "redis.client",
        topology=target.kind,
        tls=target.tls,
        url=redact_url(url),
        service=target.service,
        nodes=[f"{host}:{port}" for host, port in target.nodes] or None,
    )
    if target.kind == "sentinel":
        return _sentinel(target, tls, max_connections)
    if target.kind == "cluster":
        return cast(aioredis.Redis, _cluster(target, tls, max_connections))
    # A blocking pool: a burst of requests waits for a connection instead of failing with
    # "Too many connections" (which would look like Redis being down).
    pool = _BlockingPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        **_TIMEOUTS,
        **({} if url.lower().startswith("unix:") else _KEEPALIVE),
        **tls,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it


# -- Sentinel -------------------------------------------------------------------------------------


class _BlockingSentinelPool(SentinelConnectionPool, _BlockingPool):
    """The sentinel-managed pool (asks the sentinels for the master on every new connection, drops
    connections to a former master) with the blocking pool's wait-for-a-connection behaviour."""


class _SentinelRedis(aioredis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinel_manager is not None:
                await self.sentinel_manager.aclose()


def _sentinel(target: RedisTarget, tls: dict[str, Any], max_connections: int) -> aioredis.Redis:
    ssl = {"ssl": True, **tls} if target.tls else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        sentinel_kwargs={**_TIMEOUTS, **_KEEPALIVE, **ssl, "password": target.sentinel_password},
        **_TIMEOUTS,
        **_KEEPALIVE,
    )
    client = sentinel.master_for(
        cast(str, target.service),
        redis_class=_SentinelRedis,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT,
        db=target.db,
        username=target.username,
        password=target.password,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        **ssl,
    )
    client.sentinel_manager = sentinel
    return cast(aioredis.Redis, client)


# -- Cluster --------------------------------------------------------------------------------------

_PUBSUB_HEADROOM = 8  # connections per node beyond the command limit, for the pub/sub subscriber


class _BoundedCluster(RedisCluster):
    """RedisCluster raises MaxConnectionsError (a ConnectionError: "Redis is down") as soon as a
    node's connections are all busy. Like the standalone blocking pool, commands here wait for one
    of `max_connections` slots instead, and fail only after `pool_timeout`."""

    def __init__(self, *, max_in_flight: int, pool_timeout: float, **kwargs: Any) -> None:
        super().__init__(max_connections=max_in_flight + _PUBSUB_HEADROOM, **kwargs)
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pool_timeout = pool_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._in_flight.acquire()
        except TimeoutError:
            raise PoolExhausted("No connection available.") from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._in_flight.release()


def _cluster(target: RedisTarget, tls: dict[str, Any], max_connections: int) -> RedisCluster:
    return _BoundedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_in_flight=max_connections,
        pool_timeout=POOL_TIMEOUT,
        username=target.username,
        password=target.password,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        ssl=target.tls,
        **_TIMEOUTS,
        **_KEEPALIVE,
        **tls,
    )
