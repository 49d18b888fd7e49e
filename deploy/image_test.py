"""Build the container image from the Dockerfile and check that it serves, as a user would. CI runs it.

There is no Docker engine here; Debian's podman builds and runs the Dockerfile unchanged
(deploy/podman_setup.py installs it and makes the base image):

1. podman, buildah, runc and mmdebstrap from apt-get, when missing (needs root).
2. The base image `localhost/python:3.11-bookworm`, made with mmdebstrap once per machine.
3. `podman build` of the Dockerfile on that base (`--build-arg PYTHON_IMAGE`). `--format docker`
   because the OCI format drops the HEALTHCHECK; the host's CA bundle is mounted into the build
   because the package index may be reached through a proxy with its own CA; `--layers=false`
   because podman 4.3's layer cache reused a `COPY broker ./broker` layer after broker/ changed.
4. The container, read-only with a tmpfs /tmp, as UID 10001, with all capabilities dropped, on the
   host network, against a redis-server and tests/authserver.py on the host. Checked: /healthz,
   /readyz, /openapi.yaml (the document this checkout ships), /metrics, a real token through
   /v1/tokens/…, the HEALTHCHECK (`podman healthcheck run`), a clean stop on SIGTERM within the
   grace period, no traceback in its log; a second container started with `serve --port X` and a
   writable root: healthy too, and `podman diff` shows nothing written outside /tmp; the image
   holds no compiler, build cache, wheels, sources or tests. The image size and the time from
   `podman run` to the first 200 on /healthz are printed.

Every command is printed with its time. The image is tagged for this run only and removed at its end.

Usage (from the repository root): .venv/bin/python -m deploy.image_test
Exit 0 when every check passed. When the container runtime cannot be set up or started at all,
one line says why and the exit is 1, unless IMAGE_TEST_OPTIONAL=1, which makes that case a skip
(exit 0). A failing build or check always fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path

import httpx

from broker.callers import hash_key, new_caller_key
from broker.embedded_redis import EmbeddedRedis
from broker.vault.keyring import new_key
from deploy.podman_setup import (
    BASE_IMAGE,
    PODMAN,
    RUN,
    RuntimeUnavailable,
    install_packages,
    make_base_image,
    run,
    runtime_starts,
)
from tests.support import CLIENT_ID, CLIENT_SECRET, AuthServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = f"localhost/token-broker:image-test-{os.getpid()}"  # one per run, removed at its end
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's; the build trusts what the host trusts
UID = 10001
SCOPE = "urn:test:claims.read"
GRACE_SECONDS = 15  # compose.yaml's stop_grace_period; uvicorn drains for up to 10 s


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.timings: dict[str, float] = {}

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        print(f"{'ok  ' if ok else 'FAIL'}  {what}{f': {detail}' if detail else ''}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


# -- 3: the image -----------------------------------------------------------------------------


def _build_containers() -> set[str]:
    listed = run([*PODMAN, "ps", "--all", "--external", "--quiet", "--no-trunc"], check=False, quiet=True)
    return set(listed.stdout.split())


def build_image(checks: Checks) -> bool:
    mounts = ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.exists() else []
    before = _build_containers()
    try:
        return _build(checks, mounts)
    except BaseException:  # an interrupted `podman build` leaves its working containers behind
        for leftover in _build_containers() - before:
            run([*PODMAN, "rm", "--force", leftover], check=False)
        raise


def _build(checks: Checks, mounts: list[str]) -> bool:
    started = time.monotonic()
    build = run(
        [
            *PODMAN,
            "build",
            "--format",
            "docker",
            "--pull=never",
            # No layer cache: podman 4.3 reused a cached `COPY broker ./broker` after broker/ had changed.
            "--layers=false",
            "--build-arg",
            f"PYTHON_IMAGE={BASE_IMAGE}",
            *mounts,
            "--tag",
            IMAGE,
            str(ROOT),
        ],
        timeout=900,
        check=False,
    )
    checks.timings["build"] = time.monotonic() - started
    if not checks.check("podman build", build.returncode == 0, "" if build.returncode == 0 else "output below"):
        print(build.stdout[-6000:], build.stderr[-4000:], sep="\n")
        return False
    return True


def image_size_mb(image: str) -> float:
    return int(run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", image], quiet=True).stdout) / 1e6


def check_image_contents(checks: Checks) -> None:
    probe = (
        "import importlib.util, json, os, shutil;"
        "print(json.dumps({"
        "'compilers': [c for c in ('gcc', 'cc', 'g++', 'make') if shutil.which(c)],"
        "'leftovers': [p for p in ('/root/.cache', '/wheels', '/src', '/tmp/pip') if os.path.exists(p)],"
        "'test code': [m for m in ('tests', 'pytest', 'hypothesis', 'bench') if importlib.util.find_spec(m)],"
        "}))"
    )
    done = run([*PODMAN, "run", "--rm", *RUN, "--user", "0", "--entrypoint", "python", IMAGE, "-c", probe])
    found = {what: items for what, items in json.loads(done.stdout).items() if items}
    checks.check("image holds no compiler, pip cache, wheels, sources or tests", not found, json.dumps(found))
    inspect = run([*PODMAN, "image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE], quiet=True)
    healthcheck = (json.loads(inspect.stdout) or {}).get("Test")
    checks.check("HEALTHCHECK kept in the image (docker format)", bool(healthcheck), str(healthcheck))


# -- 4: the container -------------------------------------------------------------------------

CONFIG = """\
[server]
port = {port}
workers = 2

[credentials.payments]
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = {{ file = "/run/secrets/payments" }}
scopes = ["{scope}"]
default_scopes = ["{scope}"]

[callers.image-test]
key_sha256 = "{key_hash}"
[callers.image-test.grants]
payments = ["{scope}"]
"""


@contextlib.contextmanager
def container(name: str, options: Sequence[str], command: Sequence[str] = ()) -> Iterator[str]:
    run([*PODMAN, "run", "--detach", "--name", name, *RUN, *options, IMAGE, *command])
    try:
        yield name
    finally:
        logs = run([*PODMAN, "logs", name], check=False, quiet=True)
        if "Traceback" in logs.stdout + logs.stderr:
            print(f"--- {name} log ---\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
        run([*PODMAN, "rm", "--force", "--time", "0", name], check=False)


def wait_healthz(url: str, name: str, timeout: float = 30) -> float | None:
    """Seconds until /healthz first answers 200, or None (the container's log is printed)."""
    started = time.monotonic()
    with httpx.Client(timeout=1, trust_env=False) as http:
        while time.monotonic() - started < timeout:
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/healthz").status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.05)
    logs = run([*PODMAN, "logs", name], check=False, quiet=True)
    print(f"--- {name} log ---\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
    return None


def healthcheck(name: str) -> subprocess.CompletedProcess[str]:
    return run([*PODMAN, "healthcheck", "run", name], check=False, timeout=30)


def check_serving(checks: Checks, url: str, key: str, authserver: AuthServerProcess) -> None:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as http:
        deadline = time.monotonic() + 30
        while (ready := http.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        checks.check("GET /readyz", ready.status_code == 200, f"{ready.status_code} {ready.text[:200]}")
        spec = http.get("/openapi.yaml")
        shipped = (ROOT / "broker" / "openapi.yaml").read_text(encoding="utf-8")
        same = spec.status_code == 200 and spec.text == shipped
        checks.check("GET /openapi.yaml: this checkout's document", same, f"{spec.status_code} {spec.text[:80]!r}")
        caller = {"Authorization": f"Bearer {key}"}
        first = http.get("/v1/tokens/payments", params={"scope": SCOPE}, headers=caller)
        token = first.json().get("access_token") if first.status_code == 200 else None
        shown = f"expires_in {first.json().get('expires_in')}" if token else first.text[:200]  # no token in CI logs
        checks.check("GET /v1/tokens/payments: a token from the authorization server", bool(token), shown)
        again = http.get("/v1/tokens/payments", params={"scope": SCOPE}, headers=caller)
        cached = again.status_code == 200 and again.json().get("access_token") == token
        checks.check(
            "the second request is served from the cache",
            cached and authserver.token_requests() == 1,
            f"{authserver.token_requests()} upstream request(s)",
        )
        denied = http.get("/v1/tokens/payments", params={"scope": SCOPE})
        checks.check("no caller key: 401", denied.status_code == 401, str(denied.status_code))
        page = ""
        for _ in range(40):  # workers' metrics are folded into files under /tmp
            page = http.get("/metrics").text
            if 'token_broker_upstream_requests_total{credential="payments"' in page:
                break
            time.sleep(0.1)
        checks.check("GET /metrics counts the upstream request", "token_broker_upstream_requests_total" in page)


def check_main_container(checks: Checks, work: Path, redis_url: str, authserver: AuthServerProcess) -> None:
    port, key = free_port(), new_caller_key()
    config, secret = work / "config.toml", work / "payments.secret"
    config.write_text(
        CONFIG.format(
            port=port, token_url=authserver.token_url, client_id=CLIENT_ID, scope=SCOPE, key_hash=hash_key(key)
        ),
        encoding="utf-8",
    )
    secret.write_text(CLIENT_SECRET, encoding="utf-8")
    for path in (work, config, secret):  # readable by UID 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.environ["BROKER_ENCRYPTION_KEYS"] = f"image-test:{new_key()}"
    mounts = [
        f"--volume={config}:/etc/token-broker/config.toml:ro",
        f"--volume={secret}:/run/secrets/payments:ro",
        f"--env=BROKER_REDIS_URL={redis_url}",
        "--env=BROKER_ENCRYPTION_KEYS",  # its value from podman's environment: never in a command line or the log
        "--tmpfs=/tmp",
        f"--user={UID}",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
    ]
    url = f"http://127.0.0.1:{port}"
    name = f"tb-image-test-{os.getpid()}"
    started = time.monotonic()
    with container(name, ["--read-only", *mounts]):
        seconds = wait_healthz(url, name)
        if seconds is None:
            checks.check("GET /healthz (read-only root, UID 10001)", False)
            return
        checks.check("GET /healthz (read-only root, UID 10001)", True)
        checks.timings["start"] = time.monotonic() - started
        print(f"      /healthz answered {seconds:.2f} s after `podman run` returned")
        status = run([*PODMAN, "exec", name, "cat", "/proc/1/status"]).stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        checks.check(f"PID 1 runs as UID {UID}", set(uids) == {str(UID)}, " ".join(uids))
        check_serving(checks, url, key, authserver)
        health = healthcheck(name)
        checks.check("podman healthcheck run (HEALTHCHECK)", health.returncode == 0, health.stdout.strip())
        run([*PODMAN, "kill", "--signal", "TERM", name])
        stopping = time.monotonic()
        waited = run([*PODMAN, "wait", name], check=False, timeout=GRACE_SECONDS + 15)
        elapsed = time.monotonic() - stopping
        code = waited.stdout.strip()
        checks.check(
            f"SIGTERM: exits 0 within the {GRACE_SECONDS} s grace period",
            code == "0" and elapsed < GRACE_SECONDS,
            f"exit {code} after {elapsed:.1f} s",
        )
        logs = run([*PODMAN, "logs", name], quiet=True)
        text = logs.stdout + logs.stderr
        problems = [p for p in ("Traceback", "Read-only file system", '"level": "error"') if p in text]
        checks.check("no traceback, no read-only file system error in the log", not problems, ", ".join(problems))

    # `serve --port X` with no BROKER_SERVER_PORT, a writable root: healthy, and nothing written outside /tmp.
    other = free_port()
    name = f"tb-image-test-{os.getpid()}-port"
    command = ["serve", "--config", "/etc/token-broker/config.toml", "--host", "127.0.0.1", "--port", str(other)]
    with container(name, mounts, command):
        up = wait_healthz(f"http://127.0.0.1:{other}", name) is not None
        if not checks.check(f"serve --port {other}: GET /healthz", up):
            return
        token = httpx.get(
            f"http://127.0.0.1:{other}/v1/tokens/payments",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
            trust_env=False,
        )
        checks.check(f"serve --port {other}: a token", token.status_code == 200, str(token.status_code))
        health = healthcheck(name)
        checks.check(f"serve --port {other}: podman healthcheck run", health.returncode == 0, health.stdout.strip())
        # The bind mounts' targets (and their parents) appear as added: they are not writes.
        targets = [Path(option.split(":")[1]) for option in mounts if option.startswith("--volume=")]
        expected = {str(path) for target in targets for path in (target, *target.parents)}
        changes = run([*PODMAN, "diff", "--format", "json", name]).stdout
        written = sorted(set(chain.from_iterable((json.loads(changes) or {}).values())) - expected)
        checks.check("nothing written outside /tmp (podman diff)", not written, " ".join(written[:20]))


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    os.chdir(ROOT)
    signal.signal(signal.SIGTERM, _exit)  # a CI timeout still removes the containers and the image
    checks = Checks()
    started = time.monotonic()
    try:
        for step, what in ((install_packages, "packages"), (make_base_image, "base"), (runtime_starts, "preflight")):
            began = time.monotonic()
            step()
            checks.timings[what] = time.monotonic() - began
    except RuntimeUnavailable as exc:
        if os.environ.get("IMAGE_TEST_OPTIONAL") == "1":
            print(f"image test skipped (IMAGE_TEST_OPTIONAL=1): {exc}")
            return 0
        print(f"image test cannot run: {exc} (IMAGE_TEST_OPTIONAL=1 makes this a skip)")
        return 1
    try:
        if build_image(checks):
            check_image_contents(checks)
            size, base = image_size_mb(IMAGE), image_size_mb(BASE_IMAGE)
            print(f"      image {IMAGE}: {size:.0f} MB, of which {size - base:.0f} MB above the base ({base:.0f} MB)")
            with (
                tempfile.TemporaryDirectory(prefix="tb-image-test-") as work,
                EmbeddedRedis() as redis,
                AuthServerProcess() as authserver,
            ):
                check_main_container(checks, Path(work), redis.url, authserver)
    finally:
        run([*PODMAN, "rmi", "--force", IMAGE], check=False, quiet=True)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in checks.timings.items())
    print(f"image test: {timings}; {time.monotonic() - started:.0f} s in all")
    if checks.failed:
        print(f"image test FAILED: {'; '.join(checks.failed)}")
        return 1
    print("image test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
