"""The chart as the real helm reads it: its schema refuses wrong values naming them, it lints
and renders with the defaults and with every option changed, and what it renders is what the
values say (the engine's DaemonSet only for userspace, the ServiceMonitors only where their API
exists, a dashboard that Grafana can load)."""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

import pytest
import yaml

from podwire.sandbox import tools

CHART = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "helm" / "podwire"
CIDRS = "agent.clusterPodCIDRs=10.244.0.0/16"

# Every option of values.yaml set to something other than its default (and valid).
EVERY_OPTION_CHANGED: dict[str, Any] = {
    "image": {"repository": "registry.example/podwire", "tag": "9.9.9", "pullPolicy": "Always"},
    "agent": {
        "clusterPodCIDRs": "10.96.0.0/12,fd00:10:96::/56",
        "datapath": "userspace",
        "listenPort": 51999,
        "device": "wgpods0",
        "failClosed": False,
        "strictMode": False,
        "mtu": 1380,
        "metricsPort": 19871,
        "metricsAddress": "127.0.0.1",
        "resyncPeriod": 60,
        "features": {
            "gro": False,
            "bigTCP": False,
            "udpGroForwarding": False,
            "threadedNAPI": False,
        },
        "stateDir": "/var/lib/podwire-test",
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "net", "effect": "NoSchedule"}
        ],
        "nodeSelector": {"kubernetes.io/os": "linux", "podwire.io/enabled": "true"},
        "priorityClassName": "system-cluster-critical",
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
    },
    "engine": {
        "enabled": True,
        "updateStrategy": {"type": "RollingUpdate"},
        "priorityClassName": "system-cluster-critical",
        "logLevel": "debug",
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
    },
    "serviceAccount": {"create": False, "name": "my-agent"},
    "ownWgnodePolicy": {"enabled": False, "validationActions": ["Warn", "Audit"]},
    "operator": {
        "enabled": True,
        "replicas": 3,
        "keyRotationInterval": "720h",
        "rotationDeadline": "5m",
        "leaseDuration": "30s",
        "staleGrace": "1m",
        "metricsPort": 19872,
        "resources": {"requests": {"cpu": "5m", "memory": "50Mi"}, "limits": {"memory": "90Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux", "node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}],
        "serviceAccount": {"create": False, "name": "my-operator"},
    },
    "metrics": {
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "5s",
            "labels": {"release": "kube-prometheus-stack"},
        },
        "dashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "labels": {"grafana_dashboard": "podwire"},
            "annotations": {"grafana_folder": "Networking"},
        },
    },
    "uninstallCleanup": {"enabled": False, "timeout": "2m"},
}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools.path("helm"), *args], capture_output=True, text=True, timeout=120)


def _render(*args: str) -> list[dict[str, Any]]:
    proc = _helm("template", "podwire", str(CHART), *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _values_file(tmp_path: pathlib.Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _find(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    (doc,) = [
        d
        for d in docs
        if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return doc


@pytest.mark.parametrize(
    ("setting", "named", "says"),
    [
        ("agent.listenPort=-1", "/agent/listenPort", "minimum: got -1, want 1"),
        ("agent.metricsPort=70000", "/agent/metricsPort", "maximum: got 70,000, want 65,535"),
        ("operator.metricsPort=0", "/operator/metricsPort", "minimum: got 0, want 1"),
        ("agent.datapath=ebpf", "/agent/datapath", "'auto', 'kernel', 'userspace'"),
        ("agent.clusterPodCIDRs=10.244.0.0/33", "/agent/clusterPodCIDRs", "'10.244.0.0/33'"),
        ("agent.clusterPodCIDRs=10.244.0.0", "/agent/clusterPodCIDRs", "does not match"),
        ("agent.clusterPodCIDRs=pods", "/agent/clusterPodCIDRs", "'pods'"),
        ("agent.mtu=100", "/agent/mtu", "anyOf"),
        ("agent.device=wg/0", "/agent/device", "'wg/0'"),
        ("agent.metricsAddress=everywhere", "/agent/metricsAddress", "'everywhere'"),
        ("agent.resyncPeriod=0", "/agent/resyncPeriod", "exclusiveMinimum"),
        ("agent.datpath=kernel", "/agent", "'datpath' not allowed"),
        ("agent.updateStrategy.type=Sometimes", "/agent/updateStrategy/type", "'OnDelete'"),
        ("engine.logLevel=loud", "/engine/logLevel", "'debug', 'verbose', 'info'"),
        ("operator.replicas=0", "/operator/replicas", "minimum: got 0, want 1"),
        ("operator.rotationDeadline=2x", "/operator/rotationDeadline", "'2x'"),
        ("operator.keyRotationInterval=monthly", "/operator/keyRotationInterval", "'monthly'"),
        (
            "ownWgnodePolicy.validationActions={Block}",
            "/ownWgnodePolicy/validationActions/0",
            "Deny",
        ),
        ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval", "'often'"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy", "'IfNotPresent'"),
        ("uninstallCleanup.timeout=soon", "/uninstallCleanup/timeout", "'soon'"),
        ("uninstallCleanup.timeout=-5s", "/uninstallCleanup/timeout", "'-5s'"),
        ("uninstallCleanup.timeout=1h", "/uninstallCleanup/timeout", "'1h'"),
        ("uninstallCleanup.enabled=maybe", "/uninstallCleanup/enabled", "boolean"),
    ],
)
def test_the_schema_refuses_a_wrong_value_naming_it(setting: str, named: str, says: str) -> None:
    for command in ("template", "lint"):
        proc = _helm(command, "podwire", str(CHART), "--set", CIDRS, "--set", setting)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {command} took {setting}"
        assert f"at '{named}'" in text and says in text, text


def test_two_stack_cidrs_and_the_defaults_pass_the_schema() -> None:
    assert _render("--set", "agent.clusterPodCIDRs=10.244.0.0/16\\, fd00:10:244::/56")


@pytest.mark.parametrize("every_option", [False, True], ids=["defaults", "every-option-changed"])
def test_the_chart_lints_and_renders(tmp_path: pathlib.Path, every_option: bool) -> None:
    args = (
        ["-f", _values_file(tmp_path, EVERY_OPTION_CHANGED)] if every_option else ["--set", CIDRS]
    )
    lint = _helm("lint", "--strict", str(CHART), *args)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout
    docs = _render(*args, "--api-versions", "monitoring.coreos.com/v1")
    assert docs


def test_every_option_changed_reaches_what_is_rendered(tmp_path: pathlib.Path) -> None:
    values = _values_file(tmp_path, EVERY_OPTION_CHANGED)
    docs = _render("-f", values, "--api-versions", "monitoring.coreos.com/v1")
    agent = _find(docs, "DaemonSet", "agent")["spec"]["template"]["spec"]
    (container,) = agent["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PODWIRE_CLUSTER_POD_CIDRS"] == "10.96.0.0/12,fd00:10:96::/56"
    assert env["PODWIRE_ENGINE_MODE"] == "external"
    assert env["PODWIRE_DEVICE"] == "wgpods0" and env["PODWIRE_LISTEN_PORT"] == "51999"
    assert env["PODWIRE_KEY_PATH"] == "/var/lib/podwire-test/private.key"
    assert container["image"] == "registry.example/podwire:9.9.9"
    assert agent["serviceAccountName"] == "my-agent"
    assert agent["priorityClassName"] == "system-cluster-critical"
    engine_ds = _find(docs, "DaemonSet", "engine")
    assert engine_ds["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    engine = engine_ds["spec"]["template"]["spec"]
    assert engine["containers"][0]["args"] == ["podwire-engine", "wgpods0"]  # tini stays PID 1
    assert engine["tolerations"] == agent["tolerations"]
    operator = _find(docs, "Deployment", "operator")
    assert operator["spec"]["replicas"] == 3
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == "my-operator"
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sorted(m["metadata"]["name"] for m in monitors) == [
        "podwire-agent",
        "podwire-operator",
    ]
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors)
    assert {m["spec"]["endpoints"][0]["interval"] for m in monitors} == {"15s"}
    ports = {
        d["metadata"]["name"]: d["spec"]["ports"][0]["port"] for d in docs if d["kind"] == "Service"
    }
    assert ports == {"podwire-agent-metrics": 19871, "podwire-operator-metrics": 19872}
    dashboard = _find(docs, "ConfigMap", "dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "podwire"
    kinds = {d["kind"] for d in docs}
    assert "ValidatingAdmissionPolicy" not in kinds and "ServiceAccount" not in kinds


def test_the_engine_daemonset_is_rendered_for_the_userspace_datapath_only() -> None:
    for datapath in ("auto", "kernel"):
        docs = _render("--set", CIDRS, "--set", f"agent.datapath={datapath}")
        assert not [d for d in docs if d["metadata"]["name"].endswith("-engine")]
        env = _find(docs, "DaemonSet", "agent")["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "PODWIRE_ENGINE_MODE", "value": "child"} in env
    off = _render(
        "--set", CIDRS, "--set", "agent.datapath=userspace", "--set", "engine.enabled=false"
    )
    agent = _find(off, "DaemonSet", "agent")["spec"]["template"]["spec"]
    assert {"name": "PODWIRE_ENGINE_MODE", "value": "child"} in agent["containers"][0]["env"]
    assert "/dev/net/tun" in [m["mountPath"] for m in agent["containers"][0]["volumeMounts"]]
    docs = _render("--set", CIDRS, "--set", "agent.datapath=userspace")
    engine = _find(docs, "DaemonSet", "engine")
    assert engine["spec"]["updateStrategy"] == {"type": "OnDelete"}
    pod = engine["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
    }
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/dev/net/tun", "/var/run/wireguard"}
    agent = _find(docs, "DaemonSet", "agent")["spec"]["template"]["spec"]
    shared = {v["name"]: v["hostPath"]["path"] for v in agent["volumes"]}
    assert shared["wireguard-sockets"] == "/var/run/wireguard"  # where the agent finds it
    # Host network: every declared port is a host port, and two pods of one node declaring
    # the same one could not both be scheduled there.
    declared = [
        (p["containerPort"], p["protocol"])
        for spec in (agent, pod)
        for c in spec["containers"]
        for p in c["ports"]
    ]
    assert len(declared) == len(set(declared)), declared
    assert (51871, "UDP") in [(p["containerPort"], p["protocol"]) for p in container["ports"]]


def test_the_servicemonitors_only_where_their_api_exists() -> None:
    on = ("--set", CIDRS, "--set", "metrics.serviceMonitor.enabled=true")
    assert not [d for d in _render(*on) if d["kind"] in ("ServiceMonitor", "Service")]
    with_api = _render(*on, "--api-versions", "monitoring.coreos.com/v1")
    assert len([d for d in with_api if d["kind"] == "ServiceMonitor"]) == 2
    off = _render("--set", CIDRS, "--api-versions", "monitoring.coreos.com/v1")
    assert not [d for d in off if d["kind"] == "ServiceMonitor"]
    no_operator = _render(*on, "--set", "operator.enabled=false", "--api-versions", "monitoring.coreos.com/v1")  # fmt: skip
    assert [d["metadata"]["name"] for d in no_operator if d["kind"] == "ServiceMonitor"] == [
        "podwire-agent"
    ]


def test_the_dashboard_is_a_grafana_dashboard_in_a_configmap() -> None:
    docs = _render("--set", CIDRS)
    dashboard = json.loads(_find(docs, "ConfigMap", "dashboard")["data"]["podwire.json"])
    assert dashboard["uid"] == "podwire" and dashboard["title"] == "podwire"
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(queries) >= 20 and all("podwire_" in q for q in queries)
    off = _render("--set", CIDRS, "--set", "metrics.dashboard.enabled=false")
    assert not [d for d in off if d["kind"] == "ConfigMap"]


def test_every_pod_is_held_to_the_tightest_security_context() -> None:
    docs = _render("--set", CIDRS, "--set", "agent.datapath=userspace")
    for kind, component in (("DaemonSet", "agent"), ("DaemonSet", "engine"), ("Deployment", "operator"), ("Job", "uninstall")):  # fmt: skip
        pod = _find(docs, kind, component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, component
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, component
            assert security["readOnlyRootFilesystem"] is True, component
            assert security["capabilities"]["drop"] == ["ALL"], component
            assert set(security["capabilities"].get("add", [])) <= {"NET_ADMIN"}, component
            assert "privileged" not in security, component
            assert container["resources"]["requests"] and container["resources"]["limits"]
        if component not in ("operator", "uninstall"):
            assert pod["priorityClassName"] == "system-node-critical", component


def test_the_uninstall_hook_arms_the_agents_before_anything_is_deleted() -> None:
    docs = [
        d
        for d in _render("--set", CIDRS, "--set", "uninstallCleanup.timeout=90s")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "uninstall"
    ]
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    weights = {}
    for kind, doc in by_kind.items():
        notes = doc["metadata"]["annotations"]
        assert notes["helm.sh/hook"] == "pre-delete", kind
        assert notes["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        weights[kind] = int(notes["helm.sh/hook-weight"])
    assert (
        max(weights[k] for k in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"))
        < (weights["Job"])
    )
    assert by_kind["ClusterRole"]["rules"] == [
        {"apiGroups": ["podwire.io"], "resources": ["wgnodes"], "verbs": ["get", "list", "patch"]}
    ]
    pod = by_kind["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    assert pod["containers"][0]["args"] == ["podwire", "prepare-uninstall", "--timeout", "90s"]
    assert pod["restartPolicy"] == "Never"


def test_the_uninstall_hook_can_be_turned_off() -> None:
    docs = _render("--set", CIDRS, "--set", "uninstallCleanup.enabled=false")
    assert not [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
