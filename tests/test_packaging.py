"""The wheel is what the image installs: an installed broker must serve everything the source tree does.

Defect (hardening 19): openapi.yaml lay beside the package instead of in it, so a broker installed
from the wheel (the container image) answered `GET /openapi.yaml` with 404. The wheel here is
built from exactly what the Dockerfile copies, installed with no index into a directory of its
own, and served by a real `token-broker serve` process that cannot see the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from broker.embedded_redis import terminate
from tests.support import REPO_ROOT, free_port, wait_http

pytestmark = pytest.mark.slow

# What the Dockerfile's build stage copies before `pip wheel .` (and all .dockerignore lets through).
BUILD_CONTEXT = ("pyproject.toml", "README.md", "broker")
PIP = (sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_CONTEXT:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = wheels.glob("token_broker-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed on its own (its dependencies come from this virtualenv)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    return target


@pytest.fixture
def installed_broker(site: Path, write_config: Callable[..., Path], tmp_path: Path) -> Iterator[str]:
    """A real broker process importing `broker` from the installed wheel, not from the source tree."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    # cwd is not the repository: `python -m` puts the working directory first on sys.path.
    where = subprocess.run(
        [sys.executable, "-c", "import broker; print(broker.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), f"broker imported from {where}, not from the installed wheel"
    port = free_port()
    log = tmp_path / "broker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(write_config()), "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", timeout=30, proc=proc, log_path=log)
        yield url
    finally:
        terminate(proc, timeout=15)


def test_installed_broker_serves_the_openapi_document_it_ships(installed_broker: str, site: Path) -> None:
    """Defect (hardening item 19): `openapi.yaml` was not in the wheel, so an installed broker
    (the image included) answered GET /openapi.yaml with 404."""
    response = httpx.get(f"{installed_broker}/openapi.yaml", timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/yaml")
    shipped = site / "broker" / "openapi.yaml"
    assert response.text == shipped.read_text(encoding="utf-8")
    assert yaml.safe_load(response.text) == yaml.safe_load((REPO_ROOT / "broker/openapi.yaml").read_text("utf-8"))


def test_wheel_holds_the_package_and_nothing_else(wheel: Path) -> None:
    """No tests, bench or deploy files in what the image installs; the typed marker and the contract in."""
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if not n.startswith(("broker/", "token_broker-"))]
    assert {"broker/py.typed", "broker/openapi.yaml", "broker/api/routes.py"} <= set(names)
