"""The operator as a real process against the session's real kube-apiserver.

Each test gets a namespace of its own for the Lease, object names of its own, and operators
started with short intervals; everything it made (processes, Leases, Nodes, WireguardNodes) is
removed afterwards, pass or fail, since the apiserver is shared by the whole session.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from podwire.sandbox import controlplane

BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parents[3]
CRD_FILE = ROOT / "deploy" / "helm" / "podwire" / "crds" / "wireguardnodes.yaml"


def public_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.2) -> Any:
    """check()'s first true answer; fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        time.sleep(every)


@dataclasses.dataclass
class OperatorProcess:
    identity: str
    port: int
    log: pathlib.Path
    proc: subprocess.Popen[bytes]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        code, text = self.get("/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines() if code == 200 else ():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def leading(self) -> bool:
        return self.metrics().get("podwire_operator_leader") == 1.0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


class Operators:
    """Starts podwire-operator processes (the installed entry point) and ends them."""

    def __init__(self, cp: controlplane.ControlPlane, namespace: str, workdir: pathlib.Path):
        self.cp = cp
        self.namespace = namespace
        self.workdir = workdir
        self.started: list[OperatorProcess] = []

    def start(self, identity: str, *flags: str) -> OperatorProcess:
        port = controlplane.free_port()
        log = self.workdir / f"{identity}.log"
        argv = [
            str(BIN / "podwire-operator"),
            f"--kubeconfig={self.cp.kubeconfig}",
            f"--namespace={self.namespace}",
            f"--identity={identity}",
            f"--metrics-address=127.0.0.1:{port}",
            "--resync=1s",
            *flags,
        ]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        op = OperatorProcess(identity, port, log, proc)
        self.started.append(op)
        wait_for(lambda: op.get("/healthz")[0] == 200 or proc.poll() is not None, timeout=30, what=f"{identity} serving")  # fmt: skip
        assert proc.poll() is None, f"{identity} exited: {log.read_text()}"
        return op

    def stop_all(self) -> None:
        for op in self.started:
            op.kill(signal.SIGKILL)


class Objects:
    """Nodes and WireguardNodes made through kubectl, as a user or an agent would."""

    def __init__(self, cp: controlplane.ControlPlane) -> None:
        self.cp = cp
        self.prefix = f"op{uuid.uuid4().hex[:6]}"
        self.names: set[str] = set()

    def name(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self.names.add(name)
        return name

    def node(self, name: str, *, pod_cidrs: list[str]) -> dict[str, Any]:
        self.names.add(name)
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"podwire.io/test": "operator"}},
            "spec": {"podCIDRs": pod_cidrs, "podCIDR": pod_cidrs[0]} if pod_cidrs else {},
        }
        return self._apply(body)

    def wgnode(
        self, name: str, *, key: str | None = None, annotations: dict[str, str] | None = None
    ) -> dict[str, Any]:
        self.names.add(name)
        body = {
            "apiVersion": "podwire.io/v1alpha1",
            "kind": "WireguardNode",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"publicKey": key or public_key(), "listenPort": 51871},
        }
        return self._apply(body)

    def _apply(self, body: dict[str, Any]) -> dict[str, Any]:
        out = self.cp.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(body)).stdout
        created: dict[str, Any] = json.loads(out)
        return created

    def status(self, name: str, **status: Any) -> None:
        patch = json.dumps({"status": status})
        self.cp.kubectl("patch", "wgnode", name, "--subresource=status", "--type=merge", "-p", patch)  # fmt: skip

    def annotate(self, name: str, **annotations: str | None) -> None:
        patch = json.dumps({"metadata": {"annotations": annotations}})
        self.cp.kubectl("patch", "wgnode", name, "--type=merge", "-p", patch)

    def get(self, name: str) -> dict[str, Any] | None:
        proc = self.cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
        if proc.returncode != 0:
            return None
        obj: dict[str, Any] = json.loads(proc.stdout)
        return obj

    def condition(self, name: str, type: str) -> dict[str, Any] | None:
        obj = self.get(name) or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c.get("type") == type), None)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = self.cp.kubectl(
            "get", "events", "-n", "default", "-o", "json",
            f"--field-selector=involvedObject.name={name}",
        ).stdout  # fmt: skip
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    def delete_node(self, name: str) -> None:
        self.cp.kubectl("delete", "node", name, "--wait=false")

    def clean(self) -> None:
        for name in sorted(self.names):
            self.cp.kubectl("delete", "wgnode", name, "--ignore-not-found", "--wait=false", check=False)  # fmt: skip
            self.cp.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)  # fmt: skip
        for name in sorted(self.names):
            self.cp.kubectl(
                "delete", "events", "-n", "default", f"--field-selector=involvedObject.name={name}",
                "--ignore-not-found", check=False,
            )  # fmt: skip


@pytest.fixture
def objects(crds: controlplane.ControlPlane) -> Iterator[Objects]:
    objs = Objects(crds)
    try:
        yield objs
    finally:
        objs.clean()
