"""deploy/kubernetes/: valid Kubernetes objects, the Pod Security "restricted" profile, and
settings that agree with the image and the proxy's config."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import DEPLOY, check_with_proxy

K8S = DEPLOY / "kubernetes"
MANIFESTS = ["secret.yaml", "configmap.yaml", "deployment.yaml", "networkpolicy.yaml"]
MANIFESTS += ["poddisruptionbudget.yaml"]
# The oldest Kubernetes still commonly run, and the newest kubernetes-validate knows.
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return loaded


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = load("deployment.yaml")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    return next(c for c in pod()["containers"] if c["name"] == name)


def dockerfile() -> str:
    return (DEPLOY.parent / "Dockerfile").read_text()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_each_manifest_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    # strict: an unknown field (a typo) is an error, as `kubectl apply` would report it.
    kubernetes_validate.validate(load(name), version, strict=True)


def test_a_misspelt_field_is_caught() -> None:
    broken = copy.deepcopy(load("deployment.yaml"))
    broken["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = load("kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(MANIFESTS)
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*MANIFESTS, "kustomization.yaml"])


# -- Pod Security Standards, "restricted" profile (the pod-security-standards page of the
# Kubernetes documentation), as the PodSecurity admission controller checks it

_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The restricted profile's checks, as the admission controller applies them."""
    found = []
    pod_ctx = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds}")
    containers = spec["containers"] + spec.get("initContainers", [])
    for c in containers:
        ctx = c.get("securityContext", {})
        where = c["name"]
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation")
        if ctx.get("privileged"):
            found.append(f"{where}: privileged")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: capabilities.drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities.add")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where}: hostPort")
        if ctx.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount")
    return found


def test_the_pod_passes_the_restricted_profile() -> None:
    assert restricted_violations(pod()) == []


def test_the_restricted_check_notices_a_violation() -> None:
    spec = copy.deepcopy(pod())
    del spec["securityContext"]["seccompProfile"]
    spec["containers"][1]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(spec) == [
        "volume host: {'hostPath'}",
        "app: seccompProfile",
        "luxsci-proxy: seccompProfile",
        "luxsci-proxy: capabilities.drop ALL",
    ]


# -- agreement with the image and the proxy's config


def configmap_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(load("configmap.yaml")["data"]["config.yaml"])
    return loaded


def test_the_proxy_container_matches_the_image() -> None:
    proxy = container("luxsci-proxy")
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile())
    assert uid is not None
    assert proxy["securityContext"]["runAsUser"] == int(uid[1])
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    state_dir = re.search(r"LUXSCI_PROXY_STATE_DIR=(\S+)", dockerfile())
    config = re.search(r"LUXSCI_PROXY_CONFIG=(\S+)", dockerfile())
    assert state_dir is not None and config is not None
    # The one writable place of a read-only root is the state dir, on an emptyDir.
    assert mounts["proxy-state"] == state_dir[1]
    volumes = {v["name"]: v for v in pod()["volumes"]}
    assert "emptyDir" in volumes["proxy-state"]
    assert f"{mounts['proxy-config']}/config.yaml" == config[1]
    # No subPath: a changed ConfigMap reaches the pod, and SIGHUP applies it.
    assert all("subPath" not in m for m in proxy["volumeMounts"])


def test_probes_use_the_admin_port_and_its_endpoints() -> None:
    proxy = container("luxsci-proxy")
    admin = configmap_config()["admin"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"admin": admin["port"]}  # 8080 stays undeclared: loopback only
    assert admin["host"] == "0.0.0.0" and configmap_config()["listen"]["host"] == "127.0.0.1"
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]["memory"]


def test_the_grace_period_covers_the_drain() -> None:
    """preStop sleep + shutdown_timeout + the cut-off and the session revoke (15 s)."""
    sleep = container("luxsci-proxy")["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    needed = int(sleep[1]) + configmap_config()["shutdown_timeout"] + 15
    assert pod()["terminationGracePeriodSeconds"] >= needed


def test_the_configmap_config_passes_luxsci_proxy_check(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("token-from-the-secret\n")
    (secrets / "secret").write_text("secret-from-the-secret\n")
    text = load("configmap.yaml")["data"]["config.yaml"]
    mount = next(
        m["mountPath"]
        for m in container("luxsci-proxy")["volumeMounts"]
        if m["name"] == "luxsci-api"
    )
    assert f"{mount}/token" in text
    config = tmp_path / "config.yaml"
    config.write_text(text.replace(mount, str(secrets)))
    config.chmod(0o600)
    result = check_with_proxy(config, {"LUXSCI_REDIS_URL": "rediss://:pw@redis.test:6380/0"})
    assert result.returncode == 0, result.stderr
    assert "pw" not in result.stdout  # the Redis password is masked
    checked = yaml.safe_load(result.stdout)
    assert checked["limits"]["backend"] == "redis"
    assert checked["limits"]["fallback_share"] <= 1 / load("deployment.yaml")["spec"]["replicas"]


def test_the_secret_holds_what_the_pod_reads() -> None:
    secret = load("secret.yaml")
    keys = set(secret["stringData"])
    volume = next(v for v in pod()["volumes"] if v["name"] == "luxsci-api")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert {item["key"] for item in volume["secret"]["items"]} <= keys
    for env in container("luxsci-proxy").get("env", []):
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
    # Placeholders only: nothing that could be a real credential is committed.
    assert all("<" in v for v in secret["stringData"].values())


def test_the_network_policy_opens_the_admin_port_to_monitoring_only() -> None:
    policy = load("networkpolicy.yaml")["spec"]
    labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    admin = configmap_config()["admin"]["port"]
    to_admin = [r for r in policy["ingress"] if any(p["port"] == admin for p in r["ports"])]
    assert len(to_admin) == 1
    assert to_admin[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = {(p["protocol"], p["port"]) for r in policy["egress"] for p in r["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443)} <= egress_ports


def test_the_disruption_budget_selects_the_pods_and_lets_one_go() -> None:
    pdb = load("poddisruptionbudget.yaml")["spec"]
    labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < load("deployment.yaml")["spec"]["replicas"]
