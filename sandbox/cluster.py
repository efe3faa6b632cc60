"""`podwire sandbox`: a whole podwire cluster on one machine, which outlives the command.

`up` starts etcd and the real kube-apiserver and makes one network namespace per node on a
shared underlay bridge (sandbox.topology). By default (`--runtime kubelet`) each node is a real
one (sandbox.kubenode): kube-controller-manager and kube-scheduler beside the apiserver, a
containerd and a kubelet in each node's namespaces, pods as containers, and podwire by `helm
install` of the chart with the image built here. `--runtime process`, for fast tests, installs
the CRD and the chart's RBAC and starts one agent per node as a process in its namespace, each
with its apiserver relay, and two pod namespaces behind each node. Everything it starts runs detached; every namespace,
process and file it makes is written into one record (sandbox.record), saved in the sandbox
directory as it is made, so that `down`, from any later process, removes exactly that, and a
failed `up` removes what it had made before it says which step failed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from podwire.sandbox import (
    controlplane,
    kubeletproxy,
    kubenode,
    netns,
    operatorproc,
    record,
    supervisor,
    tools,
    topology,
)
from podwire.sandbox import status as status_mod

STANDARD_DIR = "/run/podwire-sandbox"


def default_dir() -> pathlib.Path:
    """$PODWIRE_SANDBOX_DIR, else /run/podwire-sandbox."""
    return pathlib.Path(os.environ.get("PODWIRE_SANDBOX_DIR") or STANDARD_DIR)


PREFIX = "pws"
READY_TIMEOUT = 120.0
REACHABLE_TIMEOUT = 60.0
RBAC_KINDS = (
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)
AGENT_ACCOUNT = ("default", "podwire-agent")  # what `helm template podwire` names it
AGENT_TOKEN_LIFETIME = "720h"  # a static token in a kubeconfig is not refreshed
MAX_NODES = 200  # pod CIDRs are 10.244.<index>.0/24, underlay addresses 192.0.2.<10 + index>
RUNTIMES = ("process", "kubelet")
RELEASE = "podwire"  # the kubelet runtime's `helm install`, in the default namespace
CHART = tools.REPO / "deploy" / "helm" / "podwire"
CHART_DEVICE = "podwire_wg0"
PODS_PER_NODE = 2
KUBELET_PROXY_NODES = "kubeletproxy-nodes.json"  # in the control plane's folder


def kubelet_proxy_socket(st: record.Record) -> pathlib.Path:
    """The kubelet proxy's socket: a short path of its own (a unix socket's name has at most
    107 bytes, which a sandbox folder under a test's temporary directory may exceed)."""
    return pathlib.Path(f"/run/podwire-sandbox-{st.tag}-kubelets.sock")


class SandboxError(RuntimeError):
    """A sandbox step failed; the message names the step."""


class Progress:
    """One line per step, with the time since `up` began; waits report as they advance."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def step(self, line: str) -> None:
        self.say(f"[{time.monotonic() - self.started:5.1f}s] {line}")


@dataclasses.dataclass
class Sandbox:
    directory: pathlib.Path = dataclasses.field(default_factory=default_dir)

    @property
    def control_plane_dir(self) -> pathlib.Path:
        return self.directory / "controlplane"

    def load(self) -> record.Record:
        st = record.Record.load(self.directory)
        if st is None:
            raise SandboxError(f"no sandbox in {self.directory}: `podwire sandbox up` makes one")
        return st

    # -- up ----------------------------------------------------------------------------------

    def up(
        self,
        *,
        nodes: int = 3,
        datapath: str = "auto",
        runtime: str = "kubelet",
        out: TextIO = sys.stdout,
    ) -> record.Record:
        """runtime process: agents as processes, pods as bare namespaces (fast); kubelet: real
        nodes (containerd and a kubelet each), pods as real containers (sandbox.kubenode)."""
        if not 1 <= nodes <= MAX_NODES:
            raise SandboxError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
        if runtime not in RUNTIMES:
            raise SandboxError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime}")
        if runtime == "kubelet":
            try:
                kubenode.check_prerequisites()
            except kubenode.NodeError as e:
                raise SandboxError(str(e)) from None
        with self._locked():
            existing = record.Record.load(self.directory)
            if existing is not None and any(p.alive() for p in existing.processes):
                raise SandboxError(
                    f"a sandbox is already running in {self.directory} (kubeconfig "
                    f"{existing.kubeconfig}); `podwire sandbox down` removes it"
                )
            if existing is not None:  # the remains of one that died: clear them first
                _remove(existing, Progress(out))
            _clear(self.directory)
            with _interrupted_by_sigterm():
                return _Up(self, Progress(out), nodes, datapath, runtime).run()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` at a time for this directory."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SandboxError(
                    f"another `podwire sandbox up` or `down` is at work on {self.directory}"
                ) from None
            yield
        finally:
            os.close(fd)

    # -- down --------------------------------------------------------------------------------

    def down(self, *, out: TextIO = sys.stdout) -> None:
        with self._locked():
            st = record.Record.load(self.directory)
            progress = Progress(out)
            if st is not None:
                _remove(st, progress)
            shutil.rmtree(self.directory, ignore_errors=True)
            progress.step("sandbox removed" if st is not None else "no sandbox was there")

    # -- operations on a running sandbox, for the e2e tests and scripts ------------------------

    def control_plane(self, st: record.Record) -> controlplane.ControlPlane:
        """The running sandbox's control plane, for kubectl."""
        cp = controlplane.ControlPlane(self.control_plane_dir, apiserver_port=st.apiserver_port)
        if not st.apiserver_port or not cp.kubeconfig.exists():
            raise SandboxError(f"the sandbox's control plane state is gone from {self.directory}")
        return cp

    def cluster(self, st: record.Record | None = None) -> topology.Cluster:
        """The running sandbox's topology, on its record, in this process."""
        st = st or self.load()
        cp = self.control_plane(st)
        if not st.underlay_netns:
            raise SandboxError(f"the sandbox in {self.directory} has no underlay")
        return topology.Cluster(netns.NetnsFactory(record=st), cp, self.directory / "nodes")

    def restart(self, role: str, node: str = "", *, stop_only: bool = False) -> None:
        """Stops a process by its recorded PID and (unless stop_only) starts it again as it was."""
        st = self.load()
        procs = st.find(role, node)
        if not procs:
            raise SandboxError(f"no {role} process{' for ' + node if node else ''} is recorded")
        for p in procs:
            supervisor.stop(p)
            if not stop_only:
                st.replace(p, record.relaunch(p))
        st.save()

    def start_again(self, role: str, node: str = "") -> None:
        """Starts a stopped process again from its record (the apiserver after an outage)."""
        st = self.load()
        for p in st.find(role, node):
            if not p.alive():
                st.replace(p, record.relaunch(p))
        st.save()
        if role == "kube-apiserver":
            cp = self.control_plane(st)
            supervisor.wait_until(
                lambda: cp.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
                timeout=90,
                interval=0.2,
                what="kube-apiserver ready again",
            )

    def engine(self, node: str) -> record.Process | None:
        """The podwire-engine serving node's device now (the agent starts it), recorded."""
        st = self.load()
        found = find_engine(st.node(node))
        st.processes = [p for p in st.processes if not (p.role == "engine" and p.node == node)]
        if found is not None:
            st.processes.append(found)
        st.save()
        return found

    def add_node(self, name: str, *, out: TextIO = sys.stdout) -> record.Node:
        st = self.load()
        if st.runtime == "kubelet":
            raise SandboxError("adding a node to a sandbox of real nodes is not supported yet")
        c = self.cluster(st)
        index = max((n.index for n in st.nodes), default=0) + 1
        node = c.add_node(name, index=index)
        _start_node_processes(c, node, datapath=st.datapath)
        return node

    def remove_node(self, name: str) -> None:
        """Deletes the Node object, then its agent, engine and relay, then its namespaces."""
        st = self.load()
        c = self.cluster(st)
        node = st.node(name)
        c.delete_node(name)
        engine = find_engine(node)
        for p in [
            *st.find("agent", name),
            *([engine] if engine else []),
            *st.find("apiproxy", name),
        ]:
            supervisor.stop(p)
        st.processes = [p for p in st.processes if p.node != name]
        c.remove_node_network(node)
        socket = str(topology.UAPI_DIR / f"{node.device}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket)
        st.files = [f for f in st.files if f != socket]
        st.save()

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = record.Record.load(self.directory)
        if st is None:
            return {"running": False, "directory": str(self.directory)}
        return status_mod.collect(st, self.control_plane(st))


# -- up, step by step --------------------------------------------------------------------------


@contextlib.contextmanager
def _interrupted_by_sigterm() -> Iterator[None]:
    """SIGTERM stops `up` as Ctrl-C does: through the clean-up of what it made so far."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Up:
    def __init__(
        self, sandbox: Sandbox, progress: Progress, nodes: int, datapath: str, runtime: str
    ) -> None:
        self.sandbox = sandbox
        self.kubelet = runtime == "kubelet"
        self.progress = progress
        self.n = nodes
        self.datapath = datapath
        self.directory = sandbox.directory
        self.st = record.Record(
            prefix=PREFIX, directory=str(sandbox.directory), datapath=datapath, runtime=runtime
        )
        self.factory = netns.NetnsFactory(record=self.st)
        self.cp = controlplane.ControlPlane(sandbox.control_plane_dir)
        self.st.kubeconfig = str(self.cp.kubeconfig)
        self.cluster: topology.Cluster | None = None
        self.image = (kubenode.PAUSE_IMAGE, kubenode.PAUSE_ARCHIVE)  # the kubelet runtime's

    def run(self) -> record.Record:
        step = "sandbox directory"
        try:
            (self.directory / "nodes").mkdir(parents=True, mode=0o700, exist_ok=True)
            self.st.save()
            step = "underlay"
            self._underlay()
            step = "datapath"
            self._check_datapath()
            if self.kubelet:
                step = "kubelet proxy"
                self._kubelet_proxy()
            step = "control plane"
            self._control_plane()
            if self.kubelet:
                step = "image"
                self.image = kubenode.keep_image(self.directory / "images")
                step = "controllers"
                self._controllers()
            step = "CRD and RBAC"
            self._crds()
            if self.kubelet:
                step = "nodes"
                self._kube_nodes()
            for i in range(1, self.n + 1) if not self.kubelet else []:
                step = f"node node{i}"
                self._node(i)
            if self.kubelet:
                step = "Nodes Ready"
                self._wait_nodes()
                step = "pods"
                self._pods()
            if self.kubelet:
                step = "helm install"
                self._helm_install()
            else:
                step = "agents"
                self._agents()
                step = "operator"
                self._operator()
            step = "nodes Ready"
            self._wait_ready()
            if self.kubelet:
                step = "rollout"
                self._wait_rollout()
            step = "pods reachable"
            self._wait_reachable()
        except BaseException as e:
            what = "interrupted during" if isinstance(e, KeyboardInterrupt) else "failed:"
            self.progress.step(f"{what} step '{step}'; removing what it made ...")
            self._checkpoint()
            _remove(self.st, self.progress)
            shutil.rmtree(self.directory, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise SandboxError(
                f"step '{step}' failed: {e}\neverything it had made is removed"
            ) from e
        self._guide()
        return self.st

    def _checkpoint(self) -> None:
        """Writes down what exists so far: a later `down` finds it even if this process dies."""
        self.st.save()

    def _underlay(self) -> None:
        self.progress.step("underlay: a namespace with the bridge the nodes share")
        self.cluster = topology.Cluster(self.factory, self.cp, self.directory / "nodes")
        self._checkpoint()

    def _check_datapath(self) -> None:
        """Settles `auto` here, once, so that every agent (and every restart of one) runs the
        same datapath: an agent restarted with `auto` next to its engine's TUN device would
        otherwise try the kernel's first."""
        assert self.cluster is not None
        probe = self.factory.unique("k")
        made = self.cluster.underlay.ip("link", "add", probe, "type", "wireguard", check=False)
        kernel = made.returncode == 0
        if kernel:
            self.cluster.underlay.ip("link", "del", probe)
        if self.datapath == "kernel" and not kernel:
            raise SandboxError(
                "this kernel has no WireGuard (`ip link add type wireguard` failed: "
                f"{made.stderr.strip()}); use --datapath userspace or auto"
            )
        if self.datapath == "auto":
            self.datapath = "kernel" if kernel else "userspace"
            self.progress.step(
                f"datapath auto: {'WireGuard' if kernel else 'no WireGuard'} in this kernel, "
                f"so {'the kernel' if kernel else 'the userspace engine'} it is"
            )
        self.st.datapath = self.datapath

    def _control_plane(self) -> None:
        self.progress.step("control plane: starting etcd and kube-apiserver ...")
        try:
            self.cp.start()
        finally:  # what started is recorded, even when the other did not
            self.st.processes.extend(self.cp.processes.values())
        self.st.apiserver_url = self.cp.url
        self.st.apiserver_port = self.cp.apiserver_port
        self._checkpoint()
        self.progress.step(f"control plane ready at {self.cp.url}")

    def _crds(self) -> None:
        self.progress.step("installing the WireguardNode CRD")
        self.cp.install_crds()
        rbac = "" if self.kubelet else _chart_rbac()  # helm install brings them on real nodes
        if rbac:
            self.progress.step(
                "applying the chart's RBAC and admission policy; agents authenticate as its "
                "account, each with a token bound to a Pod on its own Node"
            )
            self.cp.kubectl("apply", "-f", "-", input=rbac)

    def _kubelet_proxy(self) -> None:
        """The apiserver's way to the kubelets for logs and exec (sandbox.kubeletproxy), started
        before the apiserver that is told about it (its egress selector); the apiserver shows the
        kubelets its own client certificate and checks theirs against the sandbox's CA."""
        workdir = self.sandbox.control_plane_dir
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "kubeletproxy.log"
        log.write_text("")
        sock = kubelet_proxy_socket(self.st)
        self.st.files.append(str(sock))  # outside the sandbox folder: `down` removes it
        argv = [sys.executable, "-m", "podwire.sandbox.kubeletproxy", "--socket", str(sock),
                "--nodes", str(workdir / KUBELET_PROXY_NODES)]  # fmt: skip
        proc = record.launch("kubeletproxy", argv, log=log)
        self.st.processes.append(proc)
        self._checkpoint()

        def ready() -> bool:
            if not proc.alive():
                raise SandboxError(f"the kubelet proxy exited: see {log}\n{_tail(log)}")
            return "ready" in log.read_text()

        supervisor.wait_until(ready, timeout=30, interval=0.1, what="the kubelet proxy")
        egress = {
            "apiVersion": "apiserver.k8s.io/v1beta1",
            "kind": "EgressSelectorConfiguration",
            "egressSelections": [{
                "name": "cluster",
                "connection": {"proxyProtocol": "HTTPConnect",
                               "transport": {"uds": {"udsName": str(sock)}}},
            }],
        }  # fmt: skip
        (workdir / "egress-selector.json").write_text(json.dumps(egress, indent=2))
        pki = workdir / "pki"  # certs.make writes them there as the apiserver starts
        self.cp.extra_args += [
            f"--egress-selector-config-file={workdir / 'egress-selector.json'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            # The address the kubelet serves on and its certificate names; Hostname, the
            # default's first, is a name no resolver here knows.
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _controllers(self) -> None:
        self.progress.step("starting kube-controller-manager and kube-scheduler")
        try:
            self.cp.start_controllers()
        finally:
            for role in ("kube-controller-manager", "kube-scheduler"):
                if role in self.cp.processes:
                    self.st.processes.append(self.cp.processes[role])
            self._checkpoint()

    def _node(self, index: int) -> None:
        assert self.cluster is not None
        self.progress.step(f"node{index}: namespace, underlay link, pod bridge, two pods, Node")
        self.cluster.add_node(f"node{index}", index=index)
        self._checkpoint()

    def _kube_nodes(self) -> None:
        """Real nodes: each one's namespace on the underlay and Node object (with its pod CIDR,
        which the kubelet keeps), relay and files, one after the other; then their mount
        namespaces, containerd (with the images) and kubelets, all at once."""
        assert self.cluster is not None
        nodes = []
        for index in range(1, self.n + 1):
            name = f"node{index}"
            self.progress.step(f"{name}: namespace, underlay link, Node, relay")
            node = self.cluster.add_node(
                name, index=index, pods=0, pod_bridge=False, device=CHART_DEVICE
            )
            self._checkpoint()
            self.cluster.start_proxy(node)
            kn = kubenode.KubeNode(self.st, self.cp, node)
            kn.write_config(kubenode.make_cgroup_root(self.st, node))
            nodes.append(kn)
        kubeletproxy.write_nodes(
            self.sandbox.control_plane_dir / KUBELET_PROXY_NODES,
            {kn.node.underlay_ip: kn.node.netns for kn in nodes},
        )
        kubenode.save_sysctls(self.st)
        self.progress.step(f"starting containerd, the images and a kubelet on {self.n} nodes ...")
        errors = []
        # Every start is waited for, failed or not, before the clean-up of a failure begins.
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, self.n)) as pool:
            started = {pool.submit(self._start_kube_node, kn): kn for kn in nodes}
            for done in concurrent.futures.as_completed(started):
                try:
                    done.result()
                except Exception as e:
                    errors.append(f"{started[done].node.name}: {e}")
        self._checkpoint()
        if errors:
            raise SandboxError("; ".join(errors))

    def _start_kube_node(self, kn: kubenode.KubeNode) -> None:
        kn.start_mounts()
        kn.start_containerd()
        _, archive = self.image
        for a in dict.fromkeys([kubenode.PAUSE_ARCHIVE, archive]):
            kn.import_image(a)
        kn.discard_layers()
        kn.route_apiserver()
        kn.start_kubelet()
        self.progress.step(f"{kn.node.name}: containerd and kubelet started")

    def _wait_nodes(self) -> None:
        names = [n.name for n in self.st.nodes]
        self.progress.step(f"waiting for {len(names)} Nodes to be Ready ...")

        def kubelets_alive() -> None:
            for p in self.st.processes:
                if p.role in ("kubelet", "containerd") and not p.alive():
                    raise SandboxError(
                        f"the {p.role} of {p.node} exited: see {p.log}\n{_tail(pathlib.Path(p.log))}"
                    )

        _wait_progress(
            self.progress, lambda: kubenode.node_ready(self.cp, names), len(names),
            "Nodes Ready", READY_TIMEOUT, check=kubelets_alive,
        )  # fmt: skip

    def _pods(self) -> None:
        """PODS_PER_NODE real pods on each node, each one's network namespace given a name on
        the machine (`ip netns attach`), so that status, verify and a user reach it as before."""
        image, _ = self.image
        self.progress.step(f"starting {PODS_PER_NODE} pods on each node ({image})")
        wanted = {f"{n.name}-pod{k}": n for n in self.st.nodes for k in range(PODS_PER_NODE)}
        items = [kubenode.pod_manifest(name, n.name, image) for name, n in wanted.items()]
        self.cp.kubectl("apply", "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))  # fmt: skip
        running: dict[str, dict[str, Any]] = {}

        def count() -> int:
            out = self.cp.kubectl("get", "pods", "-n", kubenode.POD_NAMESPACE,
                                  "-l", "podwire.io/sandbox-pod=true", "-o", "json")  # fmt: skip
            for item in json.loads(out.stdout)["items"]:
                if item["status"].get("phase") == "Running" and item["status"].get("podIP"):
                    running[item["metadata"]["name"]] = item
            return sum(1 for n in wanted if n in running)

        try:
            _wait_progress(self.progress, count, len(wanted), "pods Running", READY_TIMEOUT)
        except TimeoutError as e:
            raise SandboxError(f"{e}: {kubenode.pods_waiting(self.cp)}") from None
        assert self.cluster is not None
        for name, node in wanted.items():
            item = running[name]
            pid = kubenode.pod_pid(self.st, node, item["metadata"]["uid"])
            if pid is None:
                raise SandboxError(f"pod {name} runs, but none of its processes was found")
            ns = self.factory.unique("p")
            subprocess.run(["ip", "netns", "attach", ns, str(pid)], check=True,
                           capture_output=True)  # fmt: skip
            self.st.namespaces.append(ns)
            node.pods.append(record.Pod(name, ns, item["status"]["podIP"], node.name))
            self._checkpoint()

    def _helm_install(self) -> None:
        """podwire as a cluster gets it: `helm install` of the chart, with the image built here
        (imported into every node's containerd, never pulled); agents are DaemonSet pods."""
        ref, _ = self.image
        if ref == kubenode.PAUSE_IMAGE:
            raise SandboxError(
                f"no podwire image ({kubenode.IMAGE_CURRENT} is missing): run hack/image.sh"
            )
        repository, tag = ref.rsplit(":", 1)
        self.progress.step(f"helm install {RELEASE} {CHART} (image {ref})")
        values = {
            "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            "agent": {
                "clusterPodCIDRs": str(topology.POD_SUPERNET),
                "datapath": self.datapath,
                "device": CHART_DEVICE,
                "listenPort": topology.LISTEN_PORT,
                "resyncPeriod": 30,
            },
        }
        path = self.directory / "values.json"  # JSON is YAML: helm reads it typed, as written
        path.write_text(json.dumps(values, indent=2))
        helm(self.st, "install", RELEASE, str(CHART), "--namespace", "default", "-f", str(path))

    def _wait_rollout(self) -> None:
        """Every agent pod Ready (the DaemonSet rolled out) and the operator's Deployment
        available, as `helm install --wait` would have it."""
        self.progress.step("waiting for the agent DaemonSet and the operator Deployment ...")
        for kind in (f"daemonset/{RELEASE}-agent", f"deployment/{RELEASE}-operator"):
            found = self.cp.kubectl("get", kind, "--ignore-not-found", "-o", "name").stdout
            if found.strip():
                self.cp.kubectl("rollout", "status", kind, f"--timeout={READY_TIMEOUT:.0f}s",
                                timeout=READY_TIMEOUT + 10)  # fmt: skip

    def _agents(self) -> None:
        assert self.cluster is not None
        self.progress.step(f"starting {self.n} agents ({self.datapath} datapath) and relays")
        for node in self.cluster.nodes.values():
            _start_node_processes(
                self.cluster, node, datapath=self.datapath, proxy=not self.kubelet
            )

    def _operator(self) -> None:
        """Two podwire-operator replicas, as the chart's Deployment runs them: one leads (a
        Lease), the other waits; each authenticates as the chart's operator account."""
        self.progress.step("starting podwire-operator (2 replicas, leader election on a Lease)")
        token = self.cp.mint_token(operatorproc.NAMESPACE, "podwire-operator", duration="24h")
        workdir = self.directory / "operator"
        workdir.mkdir(mode=0o700, exist_ok=True)
        kubeconfig = self.cp.kubeconfig_for_token(token, workdir / "operator.kubeconfig")
        operatorproc.start(self.st, kubeconfig=kubeconfig, workdir=workdir)
        self._checkpoint()

    def _wait_ready(self) -> None:
        names = [n.name for n in self.st.nodes]
        self.progress.step(f"waiting for {len(names)} WireguardNodes to be Ready ...")
        try:
            _wait_progress(
                self.progress,
                lambda: self._ready_count(names),
                len(names),
                "Ready",
                READY_TIMEOUT,
                check=self._agents_alive,
            )
        except TimeoutError as e:
            if not self.kubelet:
                raise
            raise SandboxError(f"{e}; pods not running: {kubenode.pods_waiting(self.cp)}") from None
        # An agent's engine is the sandbox's to stop; a real node's (a pod) is its kubelet's.
        for n in [] if self.kubelet else self.st.nodes:
            engine = find_engine(n)
            if engine is not None:
                self.st.processes.append(engine)
        self._checkpoint()

    def _agents_alive(self) -> None:
        if self.kubelet:
            for node in self.st.nodes:
                crashed = kubenode.crashed_containers(node)
                if crashed:
                    name, log = crashed[0]
                    raise SandboxError(
                        f"the {name} container on {node.name} exited more than once: see {log}\n"
                        f"{_tail(log)}"
                    )
        for p in self.st.processes:
            if p.role == "agent" and not p.alive():
                raise SandboxError(
                    f"the agent of {p.node} exited: see {p.log}\n{_tail(pathlib.Path(p.log))}"
                )

    def _ready_count(self, names: list[str]) -> int:
        items = status_mod.wgnodes(self.cp) or {}
        return sum(1 for n in names if status_mod.is_ready(items.get(n, {})))

    def _wait_reachable(self) -> None:
        st = self.st
        pairs = len(st.pods()) * (len(st.pods()) - 1)
        self.progress.step(f"waiting for every pod to reach every other ({pairs} pairs) ...")

        def count() -> int:
            return sum(1 for c in status_mod.connectivity(st) if c["ok"])

        _wait_progress(self.progress, count, pairs, "pairs reachable", REACHABLE_TIMEOUT)

    def _guide(self) -> None:
        say = self.progress.say
        self.progress.step(f"sandbox up: {self.n} nodes, {len(self.st.pods())} pods")
        say("")
        say(f"kubeconfig: {self.st.kubeconfig}")
        say("")
        say("Try:")
        say(f"  export KUBECONFIG={self.st.kubeconfig} PATH={tools.BUILT}:$PATH")
        say("  kubectl get wgnodes              # every node Ready, its key, endpoint, datapath")
        if self.kubelet:
            say(
                "  kubectl get nodes,pods -A -o wide  # real nodes; agents, engines, operator as pods"
            )
            say(f"  kubectl logs ds/{RELEASE}-agent    # an agent's log (its pods: -l "
                "app.kubernetes.io/component=agent)")  # fmt: skip
            say(f"  kubectl exec ds/{RELEASE}-agent -- podwire status   # the agent, from inside")
        pw = topology.BIN / "podwire"
        say(f"  {pw} sandbox status    # peers, handshakes, every pod pair reachable")
        say(f"  {pw} sandbox verify    # the capture proving only WireGuard crosses")
        a, b = self.st.nodes[0].pods[0], self.st.nodes[-1].pods[-1]
        say(f"  ip netns exec {a.netns} ping {b.ip}    # {a.name} -> {b.name}")
        say(f"  {pw} peers --socket {self.st.nodes[0].api_socket}")
        say(f"  {pw} sandbox down      # removes every namespace, process and file")
        if str(self.sandbox.directory) != STANDARD_DIR:
            say(f"(with PODWIRE_SANDBOX_DIR={self.sandbox.directory} set for the podwire commands)")


def helm(st: record.Record, *args: str, timeout: float = 300) -> str:
    """The real helm on the sandbox, its caches and settings in the sandbox's folder."""
    home = pathlib.Path(st.directory) / "helm"
    env = {
        **os.environ,
        "KUBECONFIG": st.kubeconfig,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    out = subprocess.run(
        [tools.path("helm"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if out.returncode != 0:
        raise SandboxError(f"helm {' '.join(args[:2])} failed: {out.stderr.strip()}")
    return out.stdout


def _start_node_processes(
    c: topology.Cluster, node: record.Node, *, datapath: str, proxy: bool = True
) -> None:
    """The node's relay and agent; the agent authenticates as the chart's account when the
    chart gave one, as a cluster's agent does: with a token bound to its Pod on its Node (the
    admin's certificate would prove nothing about the chart's RBAC and policy)."""
    namespace, account = AGENT_ACCOUNT
    found = c.cp.kubectl(
        "get", "serviceaccount", account, "-n", namespace, "--ignore-not-found", "-o", "name"
    ).stdout.strip()
    env = {}
    if found:
        kubeconfig = c.agent_kubeconfig(node, namespace, account, duration=AGENT_TOKEN_LIFETIME)
        env = {"KUBECONFIG": str(kubeconfig)}
    if proxy:
        c.start_proxy(node)
    c.start_agent(node, datapath=datapath, env=env)


def find_engine(node: record.Node) -> record.Process | None:
    """The engine process in node's namespace: started by its agent, so not by us directly."""
    for pid in netns.pids(node.netns):
        argv = supervisor.cmdline(pid)
        if any("podwire-engine" in a or "wireguard-go" in a for a in argv[:3]):
            started = supervisor.start_time(pid)
            if started is not None:
                log = str(node.workdir / f"{node.device}-engine.log")
                return record.Process(
                    "engine", pid, started, argv, log, node.name, node.netns,
                    {"WG_PROCESS_FOREGROUND": "1"},
                )  # fmt: skip
    return None


# -- down --------------------------------------------------------------------------------------


def _remove(st: record.Record, progress: Progress) -> None:
    """Ends the recorded processes, deletes the recorded namespaces and files; reports leftovers."""
    # Engines the agents started since the state was written (a real node's are pods: they go
    # with the node's cgroups, once its kubelet can no longer start them again).
    for n in st.nodes if st.runtime != "kubelet" else []:
        engine = find_engine(n)
        if engine is not None and not any(p.pid == engine.pid for p in st.processes):
            st.processes.append(engine)
    # Those that act on the cluster first (so none reacts to the others going), the apiserver
    # and its store last; a role not named here is stopped first of all, never left running.
    order = (
        "operator", "agent", "engine", "kubelet", PODS, "containerd", SHIMS, "node-mounts",
        "apiproxy", "kubeletproxy", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd",
    )  # fmt: skip
    live = [p for p in st.processes if p.alive()]
    if live:
        progress.step(f"stopping {len(live)} processes ...")
    supervisor.stop_all(p for p in live if p.role not in order)
    for role in order:
        if role == PODS:  # the pods' containers, which no kubelet restarts any more
            for root in st.cgroups:
                for pid in kubenode.cgroup_pids(root):
                    supervisor.kill(pid)
        elif role == SHIMS:  # containerd's shims, left in the nodes' namespaces
            for n in st.nodes if st.runtime == "kubelet" else []:
                if _netns_exists(n.netns):
                    for pid in netns.pids(n.netns):
                        if any("containerd-shim" in a for a in supervisor.cmdline(pid)[:1]):
                            supervisor.kill(pid)
        supervisor.stop_all(p for p in live if p.role == role)
    names = list(dict.fromkeys([*st.namespaces, *_unrecorded_namespaces(st)]))
    if names:
        progress.step(f"deleting {len(names)} namespaces (their links go with them) ...")
    for name in reversed(names):
        if not _netns_exists(name):
            continue
        strangers = netns.pids(name)
        if strangers:
            progress.say(
                f"  note: {name} still holds processes the sandbox did not start "
                f"({', '.join(map(str, strangers))}); its links live until they exit"
            )
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    for f in st.files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)
    if st.cgroups:
        progress.step(f"removing the kubelets' cgroups and restoring {len(st.sysctls)} sysctls")
    for cgroup in kubenode.remove_cgroups(st):
        progress.say(f"  note: could not remove the cgroup {cgroup}")
    for key in kubenode.restore_sysctls(st):
        progress.say(f"  note: could not restore {key} to {st.sysctls[key]}")


PODS, SHIMS = "(pods)", "(shims)"  # steps of _remove's order that are no recorded role


def _unrecorded_namespaces(st: record.Record) -> list[str]:
    """Namespaces named with this sandbox's tag that a dying `up` made but could not record."""
    pattern = re.compile(rf"^{re.escape(st.prefix)}[a-z]+{re.escape(st.tag)}\d+$")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if pattern.match(line.split()[0])]


def _clear(directory: pathlib.Path) -> None:
    """Empties directory, which stays: it holds the lock."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _netns_exists(name: str) -> bool:
    return pathlib.Path("/var/run/netns", name).exists()


def _wait_progress(
    progress: Progress,
    count: Callable[[], int],
    total: int,
    what: str,
    timeout: float,
    *,
    check: Callable[[], None] | None = None,
) -> None:
    """Waits for count() to reach total, saying each new count; check() may end the wait."""
    last = -1

    def reached() -> bool:
        nonlocal last
        if check is not None:
            check()
        n = count()
        if n != last:
            progress.step(f"  {n}/{total} {what}")
            last = n
        return n >= total

    try:
        supervisor.wait_until(reached, timeout=timeout, interval=0.5, what=what)
    except TimeoutError:
        raise TimeoutError(f"only {last} of {total} {what} after {timeout:.0f}s") from None


def _chart_rbac() -> str:
    """The RBAC objects the Helm chart renders, when helm is there and the chart has any."""
    try:
        helm = tools.path("helm")
    except tools.ToolMissing:
        return ""
    chart = tools.REPO / "deploy" / "helm" / "podwire"
    out = subprocess.run(
        [
            helm, "template", "podwire", str(chart),
            f"--set-string=agent.clusterPodCIDRs={topology.POD_SUPERNET}",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        raise SandboxError(f"helm template failed: {out.stderr.strip()}")
    docs = [
        d
        for d in re.split(r"^---\s*$", out.stdout, flags=re.M)
        if re.search(rf"^kind: ({'|'.join(RBAC_KINDS)})\s*$", d, flags=re.M)
    ]
    return "\n---\n".join(docs)


def _tail(path: pathlib.Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
