"""deploy/: the systemd unit, the Kubernetes manifests, the Grafana dashboard, example configs.

Static checks, no lab: every file parses, the references between objects
hold, the unit passes ``systemd-analyze verify``, the example configurations
pass ``dragent config check``. Kubernetes overlays are rendered with ``kubectl
kustomize`` when kubectl is installed (skipped otherwise).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "dragent.service"
SECRETS_ENV = {
    "DRAGENT_S3_ACCESS_KEY": "x",
    "DRAGENT_S3_SECRET_KEY": "y",
    "DRAGENT_PEER_S3_ACCESS_KEY": "x",
    "DRAGENT_PEER_S3_SECRET_KEY": "y",
    "DRAGENT_PG_DSN": "postgresql://dragent@db/app",
    "DRAGENT_TOKEN": "t",
    "DRAGENT_TSIG_SECRET": "c2VjcmV0",
    "DRAGENT_PAGER_URL": "https://pager.example.internal/hook",
}


# -- systemd ------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_is_a_hardened_notify_service_with_a_watchdog() -> None:
    s = unit_settings(UNIT)
    assert s["Type"] == ["notify"]
    assert float(s["WatchdogSec"][0]) > 0
    assert s["Restart"] == ["on-failure"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["User"] == ["dragent"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["ReadWritePaths"] == ["/var/lib/dragent"]
    assert s["EnvironmentFile"][0].lstrip("-") == "/etc/dragent/dragent.env"
    assert "--config /etc/dragent/agent.toml" in s["ExecStart"][0]
    assert s["RestartPreventExitStatus"] == ["2"]  # a bad configuration is not retried


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("name", ["dragent.service", "dragent-keeper.service"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    # The unit names /usr/bin/dragent; verify checks that it is executable, so point it at ours.
    unit = tmp_path / name
    text = (DEPLOY / "systemd" / name).read_text()
    unit.write_text(text.replace("/usr/bin/dragent", str(Path(sys.executable).parent / "dragent")))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert name not in done.stderr, done.stderr


def test_env_file_example_names_every_secret_the_examples_use() -> None:
    names = {
        line.split("=")[0]
        for line in (DEPLOY / "systemd" / "dragent.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    used = set()
    for path in (DEPLOY / "examples").glob("*.toml"):
        used |= set(re.findall(r'"env:([A-Z0-9_]+)"', path.read_text()))
    assert used <= names, f"add {sorted(used - names)} to dragent.env.example"


# -- example configurations ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.glob("examples/*.toml"), *K8S.glob("overlays/*/agent.toml")]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_example_config_passes_config_check(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS_ENV.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(path)
    assert cfg.streams and cfg.peers
    assert cfg.http.token is not None  # an example never serves the API without a token
    if path.parent.name == "examples":  # the two-region example is complete
        assert {s.kind for s in cfg.streams} == {"postgres", "objects", "artifacts"}
        assert cfg.failover.enabled and cfg.failover.switches and cfg.failover.keeper_socket


# -- Kubernetes -----------------------------------------------------------------------------


def test_every_manifest_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            assert isinstance(doc, dict), path


def render(overlay: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def external_secrets() -> set[str]:
    """Secrets the README tells operators to create (first column of its table)."""
    text = (K8S / "README.md").read_text().split("## Secrets you create", 1)[1]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, re.MULTILINE))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) missing")
@pytest.mark.parametrize("region", ["a", "b"])
def test_overlay_renders_and_its_references_hold(region: str) -> None:
    docs = render(K8S / "overlays" / f"region-{region}")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]
    assert {d["metadata"]["namespace"] for d in docs} == {f"dragent-region-{region}"}
    (sts,) = by_kind(docs, "StatefulSet")
    (svc,) = by_kind(docs, "Service")
    (mon,) = by_kind(docs, "ServiceMonitor")
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (cm,) = by_kind(docs, "ConfigMap")
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(sts["spec"]["selector"]["matchLabels"])
    assert selects(svc["spec"]["selector"])
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert all(
        svc["metadata"]["labels"].get(k) == v
        for k, v in mon["spec"]["selector"]["matchLabels"].items()
    )
    assert labels["dragent.io/region"] == region

    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    agent = containers["dragent"]
    ports = {p["name"]: p["containerPort"] for c in containers.values() for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports, p
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= {
        p["name"] for p in svc["spec"]["ports"]
    }
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    job = svc["metadata"]["labels"][mon["spec"]["jobLabel"]]
    assert job == "dragent"  # the job label the alert rules and the dashboard select

    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "/readyz" in " ".join(agent["readinessProbe"]["exec"]["command"])
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    for c in containers.values():
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes or m["name"] in claims, m
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["metadata"]["name"].startswith("dragent-config-")  # the generator's hash suffix

    secrets = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    secrets |= {e["secretRef"]["name"] for c in containers.values() for e in c.get("envFrom", [])}
    missing = (
        secrets - external_secrets() - {d["metadata"]["name"] for d in by_kind(docs, "Secret")}
    )
    assert not missing, f"secrets neither generated nor documented: {missing}"

    toml = cm["data"]["agent.toml"]
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert f'region = "{region}"' in toml
    assert mounts["data"] == "/var/lib/dragent" and 'data_dir = "/var/lib/dragent"' in toml
    for key_file in re.findall(r'key_file = "([^"]+)"', toml):
        assert key_file.startswith(mounts["keys"] + "/")
    assert agent["args"][-1] == mounts["config"] + "/agent.toml"
    listen_port = int(re.search(r'listen = "[^"]*:(\d+)"', toml).group(1))
    assert ports["http"] == listen_port


# -- Grafana ---------------------------------------------------------------------------------


def documented_metrics() -> set[str]:
    text = (DEPLOY / "prometheus" / "README.md").read_text()
    return set(re.findall(r"^\| `(dragent_[a-z_]+)` \|", text, re.MULTILINE))


def recorded_metrics() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "dragent.rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(dragent[_:][a-z_:]+)", expr))


def known(name: str) -> bool:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return name in recorded_metrics() or base in documented_metrics()


def test_documented_metrics_that_name_an_exporter_are_exported_there() -> None:
    text = (DEPLOY / "prometheus" / "README.md").read_text()
    rows = re.findall(r"^\| `(dragent_[a-z_]+)` \|.*\| ([a-z_/]+\.py) \|$", text, re.MULTILINE)
    assert len(rows) > 10
    for name, source in rows:
        base = name.removesuffix("_total")
        assert f'"{base}"' in (ROOT / source).read_text(), f"{name} not in {source}"


def test_dashboard_parses_and_every_expression_names_known_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dragent.json").read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    assert len(exprs) > 20
    for expr in exprs:
        for name in metric_names(expr):
            assert known(name), f"{name} in {expr!r} is neither exported nor documented"
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("role", "rpo", "lag", "bytes", "verification", "drill"):
        assert topic in titles
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
