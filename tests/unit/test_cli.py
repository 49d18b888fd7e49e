"""The command line (spec §2, §6.2, §7.2): check-config exit codes and output, caller-key, serve's port check."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker.callers import CallerRegistry, hash_key
from broker.vault.keyring import KeyRing
from broker.vault.models import CallerSettings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-s3cret-value"
READ = "urn:axa.claims.read"

VALID = f"""
[credentials.payments]
token_url = "https://auth.example.com/oauth/token"
client_id = "my-client"
client_secret = {{ env = "CLI_PAY_SECRET" }}
scopes = ["{READ}"]

[callers.billing]
key_sha256 = "{hash_key("tbk_" + "a" * 43)}"
[callers.billing.grants]
payments = ["{READ}"]
"""


def run(*args: str, keys: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["CLI_PAY_SECRET"] = SECRET
    if keys:
        env["BROKER_ENCRYPTION_KEYS"] = os.environ["BROKER_ENCRYPTION_KEYS"]
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run("check-config", "--config", str(path))


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def test_check_config_valid_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(VALID, encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "config error" not in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = (
        VALID.replace('client_secret = { env = "CLI_PAY_SECRET" }', 'client_secret = { env = "CLI_UNSET_SECRET" }')
        .replace('scopes = ["urn:axa.claims.read"]\n', 'scopes = ["urn:axa.claims.read"]\nauth_method = "magic"\n', 1)
        .replace("[callers.billing.grants]\n", "[callers.billing.grants]\nnope = []\n")
    )
    path = tmp_path / "broker.toml"
    path.write_text(bad + "\n[server]\nport = 99999\n", encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 2
    assert_no_traceback(result)
    lines = result.stderr.splitlines()
    assert all(line.startswith("config error: ") for line in lines), lines
    keys = sorted(line.removeprefix("config error: ").split(": ", 1)[0] for line in lines)
    assert keys == [
        "callers.billing.grants.nope",
        "credentials.payments.auth_method",
        "credentials.payments.client_secret",
        "server.port",
    ]


@pytest.mark.parametrize("content", [None, "[credentials\n"], ids=["missing", "invalid-toml"])
def test_check_config_unreadable_file_exits_2(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "broker.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 2
    assert_no_traceback(result)
    [line] = result.stderr.splitlines()
    assert line.startswith("config error: config: ")


def test_literal_secret_is_warned_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(VALID.replace('{ env = "CLI_PAY_SECRET" }', '"literal-hunter2"'), encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "config warning: credentials.payments.client_secret" in result.stderr
    assert "literal-hunter2" not in result.stdout + result.stderr


def test_check_config_non_utf8_file_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_bytes(VALID.encode() + b'\n[server]\nhost = "caf\xe9"\n')
    result = check_config(path)
    assert_no_traceback(result)
    assert result.returncode == 2


def test_caller_key_prints_a_key_and_its_hash() -> None:
    result = run("caller-key", "billing")
    assert result.returncode == 0, result.stderr
    keys = [line for line in result.stdout.splitlines() if line.startswith("tbk_")]
    assert len(keys) == 1
    key = keys[0]
    assert len(key) >= len("tbk_") + 43  # >= 256 bits of urlsafe base64
    match = re.search(r'^key_sha256 = "([0-9a-f]{64})"$', result.stdout, re.MULTILINE)
    assert match is not None, result.stdout
    assert match.group(1) == hashlib.sha256(key.encode()).hexdigest()
    assert "[callers.billing]" in result.stdout.splitlines()
    # The printed pair works: a registry holding the hash accepts the key.
    registry = CallerRegistry({"billing": CallerSettings(name="billing", key_sha256=match.group(1))})
    assert registry.authenticate(f"Bearer {key}").name == "billing"


def test_caller_key_is_new_each_time() -> None:
    first, second = run("caller-key", "billing"), run("caller-key", "billing")
    assert first.stdout != second.stdout


def test_caller_key_rejects_a_name_that_cannot_be_a_toml_key() -> None:
    result = run("caller-key", "bad name]")
    assert result.returncode == 2
    assert "tbk_" not in result.stdout


def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    """`serve` on a port something else listens on used to start an embedded Redis, then end in
    uvicorn's bind error among log lines: now one line naming the port and how to pick another."""
    path = tmp_path / "broker.toml"
    path.write_text(VALID, encoding="utf-8")  # no [redis] url: serve would start an embedded Redis
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line == (
        f"error: port {port} on 127.0.0.1 is already in use: "
        "choose another with --port N, [server] port or BROKER_SERVER_PORT"
    )


def test_serve_without_an_encryption_key_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    """Spec §6.1: tokens are encrypted at rest; `serve` without a key says how to give one."""
    path = tmp_path / "broker.toml"
    path.write_text(VALID, encoding="utf-8")
    result = run("serve", "--config", str(path), keys=False)
    assert result.returncode == 2
    assert_no_traceback(result)
    [line] = result.stderr.splitlines()
    assert line.startswith("config error: vault.encryption_keys: no encryption key: set BROKER_ENCRYPTION_KEYS")
    assert "--insecure-plaintext-cache" in line


def test_a_malformed_encryption_key_is_one_config_line_without_the_key(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(VALID, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    for bad, words in [("k1:c2hvcnQ=", "is 5 bytes"), ("nokid", "kid:base64key"), ("k1:!!!!", "not base64")]:
        result = subprocess.run(
            [sys.executable, "-m", "broker", "check-config", "--config", str(path)],
            cwd=ROOT,
            env={**env, "CLI_PAY_SECRET": SECRET, "BROKER_ENCRYPTION_KEYS": bad},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("config error: BROKER_ENCRYPTION_KEYS: "), line
        assert words in line, line
        assert bad.partition(":")[2] not in line or not bad.partition(":")[2]


def test_encryption_key_prints_a_usable_key() -> None:
    result = run("encryption-key", "k2")
    assert result.returncode == 0
    [line] = result.stdout.splitlines()  # only the key: `encryption-key > keys` makes a keys file
    assert line.startswith("k2:")
    assert KeyRing.parse(line).primary == "k2"


def test_check_config_non_utf8_secret_file_is_a_problem_line_not_a_traceback(tmp_path: Path) -> None:
    """Defect: a `{ file = … }` secret that is not UTF-8 text escaped validation as a
    UnicodeDecodeError traceback instead of one problem line naming the key (exit code 2)."""
    secret = tmp_path / "payments.secret"
    secret.write_bytes(b"\xff\xfe-not-text")
    path = tmp_path / "broker.toml"
    path.write_text(VALID.replace('{ env = "CLI_PAY_SECRET" }', f'{{ file = "{secret}" }}'), encoding="utf-8")
    result = check_config(path)
    assert_no_traceback(result)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line == f"config error: credentials.payments.client_secret: secret file {secret} is not UTF-8 text"
