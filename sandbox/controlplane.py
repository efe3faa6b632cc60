"""etcd and a real kube-apiserver on loopback: the control plane of the sandbox and the tests.

Both listen on free loopback ports only. The apiserver gets its own CA and serving
certificate, authenticates the admin by client certificate (group system:masters), signs
service-account tokens with its own key, and authorizes with RBAC, as a real cluster does.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from podwire.sandbox import certs, record, supervisor, tools

CHART_CRDS = tools.REPO / "deploy" / "helm" / "podwire" / "crds"
SERVICE_CIDR = "10.96.0.0/16"  # only a setting of the apiserver; nothing is routed to it
START_TIMEOUT = 90.0


class ControlPlaneError(RuntimeError):
    """etcd or the apiserver did not start; the message names which and points at its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    workdir: pathlib.Path
    etcd_port: int = 0
    apiserver_port: int = 0
    # How often the apiserver compacts etcd's history; watches from before it get 410 Gone.
    compaction_interval: str = "5m"
    extra_args: list[str] = field(default_factory=list)
    processes: dict[str, record.Process] = field(default_factory=dict)  # by role

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def start(self) -> None:
        """Starts etcd, then the apiserver, and returns once the apiserver is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        try:
            self.processes[name] = record.launch(name, args, log=log, cwd=str(self.workdir))
        except OSError as e:
            raise ControlPlaneError(f"{e}\n{_tail(log)}") from None

    def _start_etcd(self) -> None:
        self.etcd_port = self.etcd_port or free_port()
        peer_port = free_port()
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                tools.path("etcd"),
                "--name=podwire",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=podwire={peer}",
                "--listen-metrics-urls=",
                "--log-level=warn",
                # The sandbox is disposable: fsync on every write only slows it down.
                "--unsafe-no-fsync",
            ],
        )
        self._wait("etcd", lambda: _http_ok(f"{client}/health"))

    def _start_apiserver(self) -> None:
        bundle = certs.make(self.workdir / "pki")
        self.apiserver_port = self.apiserver_port or free_port()
        self._spawn(
            "kube-apiserver",
            [
                tools.path("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={bundle.serving_cert}",
                f"--tls-private-key-file={bundle.serving_key}",
                f"--client-ca-file={bundle.ca_cert}",
                f"--service-account-key-file={bundle.sa_pub}",
                f"--service-account-signing-key-file={bundle.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                # No kubelet can reach 127.0.0.1 for the apiserver's own Service; nothing needs it.
                "--endpoint-reconciler-type=none",
                f"--etcd-compaction-interval={self.compaction_interval}",
                "--profiling=false",
                "--v=1",
                *self.extra_args,
            ],
        )
        self._write_kubeconfig(bundle)
        ctx = self.ssl_context()
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.url}/readyz", ctx))

    def start_controllers(self) -> None:
        """kube-controller-manager and kube-scheduler beside the apiserver, for real nodes: the
        controllers make a DaemonSet's pods and every namespace's kube-root-ca.crt, the
        scheduler places pods. Both as the admin, leader election off, no serving port."""
        pki = self.workdir / "pki"
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--v=1"]
        self._spawn(
            "kube-controller-manager",
            [
                tools.path("kube-controller-manager"),
                *common,
                "--secure-port=0",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=false",
                # Pod CIDRs are the sandbox's (10.244.<index>.0/24), set on each Node it makes.
                "--allocate-node-cidrs=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
            ],
        )
        self._spawn("kube-scheduler", [tools.path("kube-scheduler"), *common, "--secure-port=0"])
        for name in ("kube-controller-manager", "kube-scheduler"):
            proc, log = self.processes[name], self.workdir / f"{name}.log"
            if not proc.alive():
                raise ControlPlaneError(f"{name} exited while starting: see {log}\n{_tail(log)}")

    def ssl_context(self) -> ssl.SSLContext:
        pki = self.workdir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _write_kubeconfig(self, bundle: certs.Bundle) -> None:
        def b64(p: pathlib.Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "podwire-sandbox",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": b64(bundle.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(bundle.admin_cert),
                        "client-key-data": b64(bundle.admin_key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "podwire-sandbox",
                    "context": {"cluster": "podwire-sandbox", "user": "admin"},
                }
            ],
            "current-context": "podwire-sandbox",
        }
        fd = os.open(self.kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2)

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        proc, log = self.processes[name], self.workdir / f"{name}.log"

        def started() -> bool:
            if ready():
                return True
            if not proc.alive():
                raise ControlPlaneError(f"{name} exited while starting: see {log}\n{_tail(log)}")
            return False

        try:
            supervisor.wait_until(started, timeout=START_TIMEOUT, interval=0.2, what=name)
        except TimeoutError:
            raise ControlPlaneError(
                f"{name} was not ready after {START_TIMEOUT:.0f}s: see {log}"
            ) from None

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        kubeconfig: pathlib.Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the real kubectl against this control plane as the admin (or as the user of
        another kubeconfig, such as an agent's)."""
        proc = subprocess.run(
            [
                tools.path("kubectl"),
                f"--kubeconfig={kubeconfig or self.kubeconfig}",
                # Its discovery cache with the control plane, not one more in ~/.kube per port.
                f"--cache-dir={self.workdir / 'kubectl-cache'}",
                *args,
            ],
            capture_output=True, text=True, timeout=timeout, input=input,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def install_crds(self, directory: pathlib.Path = CHART_CRDS) -> None:
        """Applies every CRD in directory (a chart's crds/) and waits until each is served."""
        files = sorted(directory.glob("*.yaml"))
        for f in files:
            self.kubectl("apply", "-f", str(f))
        # `kubectl wait` fails at once, not waits, on a CRD the apiserver has not given a status
        # yet ("status.conditions accessor error"), which a busy machine shows now and then.
        supervisor.wait_until(
            lambda: self.kubectl(
                "wait", "--for=condition=Established", "crd", "--all", "--timeout=5s",
                check=False, timeout=15,
            ).returncode == 0,
            timeout=60, interval=0.5, what="every CRD Established",
        )  # fmt: skip

    def mint_token(
        self,
        namespace: str,
        service_account: str,
        *,
        duration: str = "1h",
        bound_pod: str | None = None,
    ) -> str:
        """A token for the service account (TokenRequest). Bound to a Pod, it is the token the
        kubelet gives that Pod: valid while the Pod exists, and it names the Pod's Node
        (authentication.kubernetes.io/node-name), which admission policies can check."""
        bound = ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"] if bound_pod else []
        return self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={duration}", *bound
        ).stdout.strip()

    def whoami(self, kubeconfig: pathlib.Path) -> dict[str, Any]:
        """Who the apiserver takes the user of kubeconfig for (a SelfSubjectReview's userInfo)."""
        out = self.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout
        user: dict[str, Any] = json.loads(out)["status"]["userInfo"]
        return user

    def kubeconfig_for_token(self, token: str, path: pathlib.Path) -> pathlib.Path:
        """A kubeconfig that authenticates with token instead of the admin certificate."""
        ca = base64.b64encode((self.workdir / "pki" / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "c", "cluster": {"server": self.url, "certificate-authority-data": ca}}
            ],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        return path

    def stop(self) -> None:
        """Ends the apiserver, then etcd: the processes this control plane started."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                supervisor.stop(proc)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
