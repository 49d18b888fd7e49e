"""Podman on this machine for deploy/image_test.py: packages, a base image, the runtime's flags.

No registry is reachable and there is no Docker engine: podman, buildah, runc and mmdebstrap come
from apt-get (when missing; needs root), and `localhost/python:3.11-bookworm` stands in for
python:3.11-slim-bookworm: mmdebstrap's bookworm (Python 3.11 with pip and venv, docs and locales
left out, without PEP 668's EXTERNALLY-MANAGED marker, as in the official python images), then
`podman import`. It is made once per machine and again when its recipe here changes, or with
IMAGE_TEST_REBUILD_BASE=1. `runc`, because crun refuses this machine's hybrid cgroups; the ulimits
are given because root may not raise rlimits here.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "BASE_IMAGE",
    "PODMAN",
    "RUN",
    "RuntimeUnavailable",
    "install_packages",
    "make_base_image",
    "run",
    "runtime_starts",
]

BASE_IMAGE = "localhost/python:3.11-bookworm"
PACKAGES = ("podman", "buildah", "runc", "mmdebstrap")
BASE_PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
PODMAN = ("podman", "--runtime", "runc")


def _hard_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# Root may not raise rlimits on this machine: give the container the limits it may have.
RUN = (
    "--network=host",
    f"--ulimit=nofile={_hard_nofile()}:{_hard_nofile()}",
    "--ulimit=nproc=32768:32768",
    "--pull=never",
)


class RuntimeUnavailable(Exception):
    """The container runtime cannot be set up or started here: not a defect of the image."""


def run(
    command: Sequence[str], *, timeout: float = 120, check: bool = True, quiet: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run and print a command with its time; raise with its output when `check` and it failed."""
    started = time.monotonic()
    with subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:  # a timeout or our SIGTERM: let podman clean up its build containers
            process.terminate()
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    done = subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
    if not quiet:
        print(f"$ {shlex.join(command)}   ({time.monotonic() - started:.1f} s, exit {done.returncode})", flush=True)
    if check and done.returncode:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return done


def _last_line(error: subprocess.CalledProcessError) -> str:
    lines = [line for line in f"{error.stdout or ''}\n{error.stderr or ''}".splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit {error.returncode}"


def install_packages() -> None:
    missing = [name for name in PACKAGES if shutil.which(name) is None]
    if not missing:
        print(f"packages: {' '.join(PACKAGES)} already installed")
        return
    if os.geteuid() != 0:
        raise RuntimeUnavailable(
            f"{' '.join(missing)} missing and apt-get needs root: apt-get install -y {' '.join(PACKAGES)}"
        )
    os.environ["DEBIAN_FRONTEND"] = "noninteractive"
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if run(install, timeout=600, check=False).returncode:
        try:
            run(["apt-get", "update", "-q"], timeout=600)
            run(install, timeout=600)
        except subprocess.CalledProcessError as exc:
            raise RuntimeUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {_last_line(exc)}") from None


# The stand-in for python:3.11-slim-bookworm; its label records how it was made, so a change here remakes it.
MMDEBSTRAP = (
    "mmdebstrap",
    "--quiet",
    "--variant=minbase",
    f"--include={BASE_PACKAGES}",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
    '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    "bookworm",
)
BASE_LABEL = "org.token-broker.image-test.base"
BASE_KEY = hashlib.sha256(shlex.join(MMDEBSTRAP).encode()).hexdigest()[:16]


def make_base_image() -> None:
    made = run([*PODMAN, "image", "inspect", "--format", "{{json .Labels}}", BASE_IMAGE], check=False, quiet=True)
    key = (json.loads(made.stdout) or {}).get(BASE_LABEL) if made.returncode == 0 else None
    if key == BASE_KEY and os.environ.get("IMAGE_TEST_REBUILD_BASE") != "1":
        print(f"base: {BASE_IMAGE} already made (IMAGE_TEST_REBUILD_BASE=1 makes it again)")
        return
    with tempfile.TemporaryDirectory(prefix="tb-base-") as work:
        rootfs = str(Path(work) / "rootfs.tar")
        changes = ("--change", "ENV=LANG=C.UTF-8", "--change", f"LABEL={BASE_LABEL}={BASE_KEY}")
        try:
            run([*MMDEBSTRAP, rootfs], timeout=900)
            run([*PODMAN, "import", "--quiet", *changes, rootfs, BASE_IMAGE], timeout=300)
        except subprocess.CalledProcessError as exc:
            raise RuntimeUnavailable(f"the base image could not be made: {_last_line(exc)}") from None


def runtime_starts() -> None:
    try:
        run([*PODMAN, "run", "--rm", *RUN, BASE_IMAGE, "python", "-c", "pass"], timeout=120)
    except subprocess.CalledProcessError as exc:
        raise RuntimeUnavailable(f"podman cannot start a container here: {_last_line(exc)}") from None
