"""`{ file = … }` secrets follow their file without a restart (spec §6.5), on real files.

Kubernetes mounts a secret as `NAME -> ..data/NAME`, `..data -> ..<timestamp>/`, and updates it
by writing a new timestamped directory and renaming a new `..data` symlink over the old one
(kubelet's AtomicWriter); `KubeSecretMount` does the same.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.secret_file import FileSecret

_STAMPS = itertools.count()


class KubeSecretMount:
    """A directory laid out and updated the way the kubelet does it."""

    def __init__(self, root: Path, name: str, value: str) -> None:
        self.root, self.name = root, name
        self.current: Path | None = None
        self.update(value)
        (root / name).symlink_to(Path("..data") / name)

    @property
    def path(self) -> str:
        return str(self.root / self.name)

    def update(self, value: str | bytes) -> None:
        stamp = self.root / f"..2026_12_01_10_00_00.{next(_STAMPS)}"
        stamp.mkdir()
        data = value.encode() if isinstance(value, str) else value
        (stamp / self.name).write_bytes(data)
        link = self.root / "..data_tmp"
        link.symlink_to(stamp.name)
        os.replace(link, self.root / "..data")  # the atomic swap
        if self.current is not None:
            shutil.rmtree(self.current)
        self.current = stamp


@pytest.fixture
def mount(tmp_path: Path) -> KubeSecretMount:
    return KubeSecretMount(tmp_path, "client-secret", "first-value\n")


def test_a_symlink_swap_is_seen_at_the_next_use(mount: KubeSecretMount) -> None:
    secret = FileSecret(mount.path, check_every=0)
    assert secret.reveal() == "first-value"
    with capture_logs() as logs:
        mount.update("second-value\n")
        assert secret.reveal() == "second-value"
        assert secret.reveal() == "second-value"
    assert [e["event"] for e in logs] == ["secret.file_changed"]
    assert logs[0]["source"] == f"file:{mount.path}"
    assert "second-value" not in repr(logs)
    assert "first-value" not in repr(logs)


def test_a_file_rewritten_in_place_is_seen_too(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("first-value", encoding="utf-8")
    secret = FileSecret(str(path), check_every=0)
    path.write_text("second-value-longer", encoding="utf-8")
    assert secret.reveal() == "second-value-longer"


def test_the_file_is_looked_at_once_per_interval_at_most(mount: KubeSecretMount) -> None:
    secret = FileSecret(mount.path, check_every=3600)
    mount.update("second-value")
    assert secret.reveal() == "first-value"  # not looked at again yet: no stat per use
    secret.check_every = 0
    assert secret.reveal() == "second-value"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"  \n", "the file is empty"), (b"\xff\xfe", "the file is not UTF-8 text")],
    ids=["empty", "not-utf8"],
)
def test_a_file_that_turns_unusable_keeps_the_last_good_value_and_says_so_once(
    mount: KubeSecretMount, content: bytes, reason: str
) -> None:
    secret = FileSecret(mount.path, check_every=0)
    with capture_logs() as logs:
        mount.update(content)
        assert [secret.reveal() for _ in range(5)] == ["first-value"] * 5
    assert [(e["event"], e["reason"]) for e in logs] == [("secret.file_unusable", reason)]
    with capture_logs() as logs:
        mount.update("fixed-value")
        assert secret.reveal() == "fixed-value"
    assert [e["event"] for e in logs] == ["secret.file_changed"]


def test_a_file_that_goes_away_keeps_the_last_good_value(mount: KubeSecretMount) -> None:
    secret = FileSecret(mount.path, check_every=0)
    assert mount.current is not None
    shutil.rmtree(mount.current)  # the link now dangles
    with capture_logs() as logs:
        assert [secret.reveal() for _ in range(3)] == ["first-value"] * 3
    assert [e["event"] for e in logs] == ["secret.file_unusable"]
    mount.current = None
    mount.update("back-value")
    assert secret.reveal() == "back-value"


def test_the_same_value_written_again_is_not_a_change(mount: KubeSecretMount) -> None:
    secret = FileSecret(mount.path, check_every=0)
    with capture_logs() as logs:
        mount.update("first-value")
        assert secret.reveal() == "first-value"
    assert logs == []


def test_a_file_secret_never_shows_its_value(mount: KubeSecretMount) -> None:
    secret = FileSecret(mount.path)
    assert "first-value" not in repr(secret) + str(secret)
    assert secret.source == f"file:{mount.path}"
