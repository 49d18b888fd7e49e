"""The container image's HEALTHCHECK: `python -m broker.healthcheck [--pid N]`.

Exit 0 when the broker answers `GET /healthz` with 200 on the port it really listens on, else 1,
with one line saying why (Docker and podman keep it in the health log). The port is read from
the kernel, not from the config: the TCP sockets in LISTEN state held by process N (1, the
entrypoint, by default) or, when it holds none (an init such as `--init` put in front), by the
first processes below it that do. So `serve --port X`, `BROKER_SERVER_PORT` and `[server] port`
are all honoured, whichever chose the port. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["listening_addresses", "main"]

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
_SOCKET = "socket:["


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in (_PROC / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing
            continue
        if target.startswith(_SOCKET):
            inodes.add(target[len(_SOCKET) : -1])
    return inodes


def _probe_host(hex_address: str) -> str:
    """The address to probe for a /proc/net/tcp local address: itself, or loopback if it is a wildcard."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":  # the kernel prints each 32-bit word in host byte order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "::1"
    return str(address)


def _listening(pid: int) -> list[tuple[str, int]]:
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / str(pid) / "net" / table).read_text(encoding="ascii").splitlines()[1:]
        except FileNotFoundError:  # no IPv6
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                host, port = fields[1].split(":")
                found.append((_probe_host(host), int(port, 16)))
    return found


def _children(pid: int) -> list[int]:
    children = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
            except OSError:  # gone since the listing
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "(comm)"
                children.append(int(entry.name))
    return sorted(children)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(host to probe, port) of the TCP listeners of `pid`, else of the nearest processes below it."""
    generation = [pid]
    while generation:
        found = [address for p in generation for address in _listening(p)]
        if found:
            return found
        generation = [child for p in generation for child in _children(p)]
    return []


def _probe(host: str, port: int, path: str, timeout: float) -> str | None:
    """None when the broker answers 200, else why not."""
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    # No proxy: a container's HTTP_PROXY must not carry a probe of its own loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--pid", type=int, default=1, help="the broker process (default: 1, the entrypoint)")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per probe")
    args = parser.parse_args(argv)
    try:
        addresses = listening_addresses(args.pid)
    except FileNotFoundError:
        print(f"unhealthy: no process {args.pid}")
        return 1
    except OSError as exc:
        print(f"unhealthy: cannot read the sockets of process {args.pid}: {exc}")
        return 1
    if not addresses:
        print(f"unhealthy: process {args.pid} and those below it listen on no TCP port")
        return 1
    problems = []
    for host, port in dict.fromkeys(addresses):
        problem = _probe(host, port, args.path, args.timeout)
        if problem is None:
            print(f"healthy: port {port}")
            return 0
        problems.append(problem)
    print(f"unhealthy: {'; '.join(problems)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
