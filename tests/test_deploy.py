"""What a platform team relies on in the deployment files, read from the files themselves.

Schemas, rendering and hadolint are `deploy/validate.py`'s job (CI runs it); these tests pin the
properties: replicas, probes, non-root and read-only, disruption budget, resources, network
policy shape, secrets by reference only, and that the Dockerfile, compose file and manifests
agree with each other and with the broker's own config loader.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.settings import load_settings
from broker.vault.keyring import new_key

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes" / "base"
UID = 10001
HEALTHZ, READYZ = "/healthz", "/readyz"
GRACEFUL_SHUTDOWN_SECONDS = 10  # uvicorn's timeout_graceful_shutdown in broker/process.py


def _yaml_documents(path: Path) -> Iterator[dict[str, Any]]:
    yield from (d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)


def _base() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    resources = [d for name in kustomization["resources"] for d in _yaml_documents(BASE / name)]
    return {r["kind"]: r for r in resources}


BASE_RESOURCES = _base()
DEPLOYMENT = BASE_RESOURCES["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
POD_LABELS = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
(CONTAINER,) = POD["containers"]
PORTS = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
MOUNTS = {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}
VOLUMES = {v["name"]: v for v in POD["volumes"]}


def _port(value: int | str) -> int:
    return PORTS[value] if isinstance(value, str) else value


def _no_persistence(redis_args: list[str]) -> bool:
    """redis-server with RDB snapshots and the append-only file both off."""
    return redis_args[redis_args.index("--save") + 1] == "" and redis_args[redis_args.index("--appendonly") + 1] == "no"


def _selects(match_labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(POD_LABELS.get(k) == v for k, v in match_labels.items())


# --- Deployment ---------------------------------------------------------------------------


def test_at_least_two_replicas_and_rollouts_never_go_below_them() -> None:
    spec = DEPLOYMENT["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert _selects(spec["selector"]["matchLabels"])


def test_probes_use_the_service_endpoints_on_the_container_port() -> None:
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == READYZ
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == HEALTHZ
    assert CONTAINER["startupProbe"]["httpGet"]["path"] == HEALTHZ
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _port(CONTAINER[probe]["httpGet"]["port"]) == 8080


def test_requests_and_limits_are_set() -> None:
    resources = CONTAINER["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


def test_runs_as_the_image_user_non_root_read_only_without_escalation() -> None:
    pod, container = POD["securityContext"], CONTAINER["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == container["runAsUser"] == UID
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert container.get("privileged", False) is False
    # With a read-only root, /tmp is the one writable place.
    assert "emptyDir" in VOLUMES[MOUNTS["/tmp"]["name"]]  # noqa: S108 - a mount path, not a temp file


def test_no_kubernetes_api_token_is_mounted() -> None:
    assert POD["automountServiceAccountToken"] is False
    account = BASE_RESOURCES["ServiceAccount"]
    assert account["automountServiceAccountToken"] is False
    assert POD["serviceAccountName"] == account["metadata"]["name"]


def test_replicas_spread_across_nodes() -> None:
    spread = POD.get("topologySpreadConstraints", [])
    anti_affinity = POD.get("affinity", {}).get("podAntiAffinity")
    assert anti_affinity or any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread)
    assert all(_selects(c["labelSelector"]["matchLabels"]) for c in spread)


def test_termination_grace_outlasts_the_graceful_shutdown() -> None:
    pre_stop = CONTAINER.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_seconds = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    assert POD["terminationGracePeriodSeconds"] > pre_stop_seconds + GRACEFUL_SHUTDOWN_SECONDS


def test_config_is_mounted_read_only_where_the_command_reads_it() -> None:
    args = CONTAINER["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = MOUNTS[str(config_path.parent)]
    assert mount["readOnly"] is True
    assert "configMap" in VOLUMES[mount["name"]]
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_secrets_arrive_by_reference_only() -> None:
    env = {e["name"]: e for e in CONTAINER["env"]}
    assert "value" not in env["BROKER_REDIS_URL"]
    assert env["BROKER_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "token-broker-redis"
    secret_mounts = {path: m for path, m in MOUNTS.items() if "secret" in VOLUMES[m["name"]]}
    assert {"/run/secrets/token-broker/clients", "/run/secrets/token-broker/encryption"} <= set(secret_mounts)
    assert all(m["readOnly"] for m in secret_mounts.values())


def test_every_secret_file_in_the_config_is_under_a_secret_mount() -> None:
    secret_dirs = [path for path, m in MOUNTS.items() if "secret" in VOLUMES[m["name"]]]
    files = _secret_files(BASE / "config.toml")
    assert files
    for file in files:
        assert any(file.startswith(d + "/") for d in secret_dirs), file


# --- Service, PDB, HPA, NetworkPolicy ------------------------------------------------------


def test_service_maps_80_to_the_container_port() -> None:
    service = BASE_RESOURCES["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert all(POD_LABELS.get(k) == v for k, v in service["selector"].items())
    (port,) = service["ports"]
    assert port["port"] == 80
    assert _port(port["targetPort"]) == 8080


def test_disruption_budget_keeps_one_pod() -> None:
    pdb = BASE_RESOURCES["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < DEPLOYMENT["spec"]["replicas"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"])


def test_autoscaler_scales_the_deployment_on_cpu_from_two() -> None:
    hpa = BASE_RESOURCES["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == DEPLOYMENT["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_network_policy_denies_by_default_and_allows_only_named_traffic() -> None:
    policy = BASE_RESOURCES["NetworkPolicy"]["spec"]
    assert _selects(policy["podSelector"]["matchLabels"])
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    # Every rule names its peers and its ports: an empty `from`, `to` or `ports` would allow all.
    for rule in policy["ingress"]:
        assert rule["from"]
        assert rule["ports"]
        assert {_port(p["port"]) for p in rule["ports"]} == {8080}
    callers = [peer for rule in policy["ingress"] for peer in rule["from"] if "podSelector" in peer]
    assert callers == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"token-broker.io/caller": "true"}}}]
    egress_ports: set[tuple[str, int]] = set()
    for rule in policy["egress"]:
        assert rule["to"]
        assert rule["ports"]
        egress_ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 443)}
    https = [rule for rule in policy["egress"] if rule["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert all("ipBlock" in peer for rule in https for peer in rule["to"])


def test_example_secrets_are_placeholders_and_never_deployed() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    assert not [r for r in kustomization["resources"] if "secret" in r]
    example = list(_yaml_documents(BASE.parent / "secret.example.yaml"))
    names = {s["metadata"]["name"] for s in example}
    referenced = {v["secret"]["secretName"] for v in VOLUMES.values() if "secret" in v}
    referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for e in CONTAINER["env"] if "valueFrom" in e}
    assert referenced == names
    for secret in example:
        assert all("CHANGE_ME" in value for value in secret["stringData"].values())


def test_the_redis_component_keeps_nothing_on_disk() -> None:
    (redis,) = [d for d in _yaml_documents(ROOT / "deploy/kubernetes/redis/redis.yaml") if d["kind"] == "Deployment"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert _no_persistence(container["args"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


# --- Dockerfile ----------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")
    ]


def test_dockerfile_is_multi_stage_and_the_last_stage_installs_wheels_only() -> None:
    instructions = _dockerfile()
    froms = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(froms) >= 2
    assert all("3.11-slim" in arg or "${PYTHON_IMAGE}" in arg for op, arg in instructions if op == "FROM")
    final = instructions[froms[-1] :]
    assert not [arg for op, arg in final if op in ("COPY", "ADD")], "the runtime stage copies no sources"
    (install,) = [arg for op, arg in final if op == "RUN" and "pip install" in arg]
    assert "--no-index" in install
    assert "from=build" in install
    build = instructions[: froms[-1]]
    assert any("--require-hashes" in arg and "requirements.lock" in arg for op, arg in build if op == "RUN")


def test_dockerfile_runs_as_the_fixed_non_root_uid_with_a_healthcheck() -> None:
    instructions = _dockerfile()
    users = [arg for op, arg in instructions if op == "USER"]
    assert users[-1].split(":")[0] == str(UID)
    (healthcheck,) = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    # /healthz on the port the entrypoint listens on: tests/test_healthcheck.py runs this command.
    assert healthcheck.endswith('CMD ["python", "-m", "broker.healthcheck"]')
    assert ("EXPOSE", "8080") in instructions
    assert ("ENTRYPOINT", '["token-broker"]') in instructions
    (cmd,) = [arg for op, arg in instructions if op == "CMD"]
    assert yaml.safe_load(cmd) == CONTAINER["args"]
    env = " ".join(arg for op, arg in instructions if op in ("ENV", "ARG"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert not re.search(r"(SECRET|PASSWORD|TOKEN|REDIS_URL)\w*=", env), "no secrets baked into the image"


def test_dockerignore_allows_only_what_the_image_needs() -> None:
    lines = [
        line for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines() if line and line[0] != "#"
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "README.md", "broker"}


# --- compose.yaml --------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_starts_the_broker_after_a_healthy_redis() -> None:
    broker, redis = COMPOSE["services"]["broker"], COMPOSE["services"]["redis"]
    assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert broker["healthcheck"]["test"]
    assert redis["healthcheck"]["test"]
    assert redis["image"].startswith("redis:7")
    assert _no_persistence(redis["command"])
    assert broker["environment"]["BROKER_REDIS_URL"].startswith("redis://redis:6379/")


def test_compose_mounts_the_config_read_only_and_secrets_as_files() -> None:
    broker = COMPOSE["services"]["broker"]
    assert "./deploy/compose/config.toml:/etc/token-broker/config.toml:ro" in broker["volumes"]
    assert broker["read_only"] is True
    declared = set(COMPOSE["secrets"])
    assert set(broker["secrets"]) == declared
    for file in _secret_files(ROOT / "deploy/compose/config.toml"):
        assert file.startswith("/run/secrets/")
        assert file.removeprefix("/run/secrets/") in declared
    assert not [k for k in broker["environment"] if re.search("SECRET|PASSWORD", k)]
    # File secrets (podman-compose 1.0.3 has no environment ones): the files are the user's, never committed.
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    for secret in COMPOSE["secrets"].values():
        assert secret["file"].removeprefix("./") in ignored


# --- the sample configs load with the broker's own loader -----------------------------------


def _secret_files(config: Path) -> list[str]:
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    secrets = [c["client_secret"] for c in data.get("credentials", {}).values()]
    assert all(isinstance(s, dict) for s in secrets), "no literal secrets in sample configs"
    return [s["file"] for s in secrets if "file" in s]


@pytest.mark.parametrize("config", ["deploy/compose/config.toml", "deploy/kubernetes/base/config.toml"])
def test_sample_config_is_valid(config: str, tmp_path: Path) -> None:
    text = (ROOT / config).read_text(encoding="utf-8")
    for file in _secret_files(ROOT / config):
        local = tmp_path / file.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("placeholder-secret\n", encoding="utf-8")
        text = text.replace(f'"{file}"', f'"{local}"')
    keys_file = tomllib.loads(text)["vault"]["encryption_keys_file"]  # the broker does not start without it
    local_keys = tmp_path / keys_file.lstrip("/")
    local_keys.parent.mkdir(parents=True, exist_ok=True)
    local_keys.write_text(f"k1:{new_key()}\n", encoding="utf-8")
    text = text.replace(f'"{keys_file}"', f'"{local_keys}"')
    copy = tmp_path / "config.toml"
    copy.write_text(text, encoding="utf-8")
    settings = load_settings(copy, env={"BROKER_REDIS_URL": "redis://redis:6379/0"})
    assert settings.keyring is not None
    assert settings.keyring.primary == "k1"
    assert settings.credentials
    assert settings.callers
    assert not settings.warnings
    assert settings.server.port == 8080
