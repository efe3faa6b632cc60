"""Nodes as network namespaces on one underlay bridge, pods as namespaces behind their node.

    ns <prefix>ul:  bridge br0 (no address: a switch)
        |                    |                      |
    node1 eth0 192.0.2.11    node2 eth0 192.0.2.12  ...   (InternalIP, the underlay)
    cbr0 10.244.1.1/24       cbr0 10.244.2.1/24           (the node's pod bridge)
      |        |               |        |
    pod 10.244.1.10  .11     pod 10.244.2.10  .11

Each node is a Node object with that InternalIP and pod CIDR, and runs one podwire-agent in its
namespace; the apiserver on the host's loopback is reached through sandbox.apiproxy. Every
namespace, node, pod and process is written into the factory's record (sandbox.record) as it
is made. Used by the agent's integration tests and by the sandbox.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import sys
from typing import Any

from podwire.sandbox import controlplane, netns, record, supervisor

UNDERLAY = ipaddress.ip_network("192.0.2.0/24")
POD_SUPERNET = ipaddress.ip_network("10.244.0.0/16")
LISTEN_PORT = 51871
BIN = pathlib.Path(sys.executable).parent
UAPI_DIR = pathlib.Path("/var/run/wireguard")

# What a cluster is made of: the record's own types, whether it is built here or loaded.
Node = record.Node
Pod = record.Pod


class Cluster:
    """Builds nodes and pods into the factory's record, and starts each node's processes."""

    def __init__(
        self, factory: netns.NetnsFactory, cp: controlplane.ControlPlane, workdir: pathlib.Path
    ) -> None:
        """A new underlay, or the one in the factory's record (made by a previous process)."""
        self.factory = factory
        self.record = factory.record
        self.cp = cp
        self.workdir = workdir
        if not self.record.underlay_netns:
            underlay = factory.namespace("ul")
            self.record.underlay_netns = underlay.name
            self.record.bridge = factory.bridge(underlay, name="br0")

    @property
    def underlay(self) -> netns.Netns:
        return netns.Netns(self.record.underlay_netns)

    @property
    def bridge(self) -> str:
        return self.record.bridge

    @property
    def nodes(self) -> dict[str, Node]:
        """The record's nodes by name (a view: add and remove them with the methods below)."""
        return {n.name: n for n in self.record.nodes}

    # -- nodes and pods ----------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        index: int | None = None,
        pods: int = 2,
        create_object: bool = True,
        pod_bridge: bool = True,
        device: str = "",
    ) -> Node:
        """A node namespace on the underlay with its Node object; with pod_bridge, its cbr0 and
        `pods` pod namespaces behind it (a real node's CNI plugin makes its own bridge)."""
        index = index if index is not None else len(self.record.nodes) + 1
        ns = self.factory.namespace("n")
        underlay_ip = str(UNDERLAY.network_address + 10 + index)
        eth, port = self.factory.unique("e"), self.factory.unique("p")
        self.factory.veth(
            ns, self.underlay, a_name=eth, b_name=port, a_addr=f"{underlay_ip}/{UNDERLAY.prefixlen}"
        )
        self.underlay.ip("link", "set", port, "master", self.bridge)
        pod_net = ipaddress.ip_network(f"10.244.{index}.0/24")
        ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        if pod_bridge:
            ns.ip("link", "add", "cbr0", "type", "bridge")
            ns.ip("addr", "add", f"{pod_net.network_address + 1}/24", "dev", "cbr0")
            ns.ip("link", "set", "cbr0", "up")
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        device = device or self.factory.unique("w")
        node = Node(name, index, ns.name, underlay_ip, str(pod_net), device, workdir)
        self.record.nodes.append(node)
        for k in range(pods if pod_bridge else 0):
            self._add_pod(node, k)
        self.record.checkpoint()
        if create_object:
            self.create_node_object(node)
        return node

    def _add_pod(self, node: Node, k: int) -> None:
        pod_ns = self.factory.namespace("p")
        net = ipaddress.ip_network(node.pod_cidr)
        gateway, ip = net.network_address + 1, str(net.network_address + 10 + k)
        inside, outside = self.factory.unique("c"), self.factory.unique("h")
        self.factory.veth(pod_ns, node.ns, a_name=inside, b_name=outside, a_addr=f"{ip}/24")
        node.ns.ip("link", "set", outside, "master", "cbr0")
        pod_ns.ip("route", "add", "default", "via", str(gateway))
        node.pods.append(Pod(f"{node.name}-pod{k}", pod_ns.name, ip, node.name))

    def node_object(
        self, node: Node, *, internal_ip: str | None = None, pod_cidrs: list[str] | None = None
    ) -> dict[str, Any]:
        addresses = [{"type": "Hostname", "address": node.name}]
        ip = node.underlay_ip if internal_ip is None else internal_ip
        if ip:
            addresses.insert(0, {"type": "InternalIP", "address": ip})
        cidrs = [node.pod_cidr] if pod_cidrs is None else pod_cidrs
        spec: dict[str, Any] = {"podCIDRs": cidrs}
        if cidrs:
            spec["podCIDR"] = cidrs[0]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": {"podwire.io/sandbox": "true"}},
            "spec": spec,
            "status": {"addresses": addresses},
        }

    def create_node_object(
        self, node: Node, *, internal_ip: str | None = None, pod_cidrs: list[str] | None = None
    ) -> None:
        obj = self.node_object(node, internal_ip=internal_ip, pod_cidrs=pod_cidrs)
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        # A Node's status is its own subresource: what kubelet reports, we report here.
        self.cp.kubectl(
            "patch", "node", node.name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": obj["status"]}),
        )  # fmt: skip

    def agent_kubeconfig(
        self, node: Node, namespace: str, service_account: str, *, duration: str = "1h"
    ) -> pathlib.Path:
        """Credentials for node's agent as a cluster gives them: a token bound to a Pod of the
        service account on node (the agent's DaemonSet Pod, which no kubelet runs here), so the
        apiserver names node in it and the chart's admission policy lets the agent write its
        own WireguardNode only. The Node object must exist first."""
        name = f"{service_account}-{node.name}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"podwire.io/sandbox": "true", "app.kubernetes.io/component": "agent"},
            },
            "spec": {
                "nodeName": node.name,
                "serviceAccountName": service_account,
                "automountServiceAccountToken": False,
                # Where a kubelet runs it (the kubelet runtime), the pause image it has.
                "containers": [
                    {
                        "name": "agent",
                        "image": "podwire.local/pause:3.10",
                        "imagePullPolicy": "Never",
                    }
                ],
            },
        }
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(pod))
        token = self.cp.mint_token(namespace, service_account, duration=duration, bound_pod=name)
        return self.cp.kubeconfig_for_token(token, node.workdir / "agent.kubeconfig")

    def delete_node(self, name: str) -> None:
        self.cp.kubectl("delete", "node", name, "--wait=false")

    def remove_node_network(self, node: Node) -> None:
        """Deletes the node's namespace and its pods' (their links go with them)."""
        for pod in node.pods:
            self.factory.delete_namespace(pod.ns)
        self.factory.delete_namespace(node.ns)
        self.record.nodes = [n for n in self.record.nodes if n.name != node.name]
        self.record.checkpoint()

    # -- a node's processes --------------------------------------------------------------------

    def start_proxy(self, node: Node) -> record.Process:
        """The node's relay to the apiserver (on the host), once it listens in the namespace."""
        port = str(self.cp.apiserver_port)
        argv = [sys.executable, "-m", "podwire.sandbox.apiproxy", "--port", port, node.netns]
        log = node.workdir / "apiproxy.log"
        log.write_text("")
        proc = self._launch(record.launch("apiproxy", argv, log=log, node=node.name))
        wait_for_proxy(log)
        return proc

    def _ensure_proxy(self, node: Node) -> None:
        """One relay per node, so that adding a node never breaks another node's watches."""
        relays = self.record.find("apiproxy", node.name)
        if not any(p.alive() for p in relays):
            self.record.processes = [p for p in self.record.processes if p not in relays]
            self.start_proxy(node)

    def agent_env(
        self, node: Node, *, datapath: str = "userspace", fail_closed: bool = True
    ) -> dict[str, str]:
        return {
            "NODE_NAME": node.name,
            "KUBECONFIG": str(self.cp.kubeconfig),
            "PODWIRE_KEY_PATH": str(node.key_path),
            "PODWIRE_DATAPATH": datapath,
            "PODWIRE_DEVICE": node.device,
            "PODWIRE_LISTEN_PORT": str(LISTEN_PORT),
            "PODWIRE_CLUSTER_POD_CIDRS": str(POD_SUPERNET),
            "PODWIRE_FAIL_CLOSED": "true" if fail_closed else "false",
            "PODWIRE_API_SOCKET": str(node.api_socket),
            "PODWIRE_RESYNC_PERIOD": "30",
            "PYTHONUNBUFFERED": "1",
        }

    def start_agent(
        self,
        node: Node,
        *,
        datapath: str = "userspace",
        fail_closed: bool = True,
        env: dict[str, str] | None = None,
    ) -> record.Process:
        """The node's agent in its namespace (and its relay, if it has none), with env on top
        of agent_env. The PODWIRE_ settings of this process are recorded with it, so that the
        agent started again from its record, by another process, runs as this one does."""
        self._ensure_proxy(node)
        passed = {k: v for k, v in os.environ.items() if k.startswith("PODWIRE_")}
        passed.pop("PODWIRE_SANDBOX_DIR", None)
        full = {**passed, **self.agent_env(node, datapath=datapath, fail_closed=fail_closed)}
        argv, log = [str(BIN / "podwire-agent")], node.workdir / "agent.log"
        launched = record.launch(
            "agent", argv, log=log, node=node.name, netns=node.netns, env={**full, **(env or {})}
        )
        socket = str(UAPI_DIR / f"{node.device}.sock")
        if socket not in self.record.files:
            self.record.files.append(socket)
        return self._launch(launched)

    def stop_agent(self, node: Node) -> None:
        agents = self.record.find("agent", node.name)
        supervisor.stop_all(agents)
        self.record.processes = [p for p in self.record.processes if p not in agents]
        self.record.checkpoint()

    def remove_sockets(self) -> None:
        """Removes the UAPI sockets of the nodes' devices (every lane's: `<device>_<i>`) and
        the engines' `.features` files beside them that are left behind: an engine ended by
        SIGKILL cannot remove its own."""
        for node in self.nodes.values():
            for path in UAPI_DIR.glob(f"{node.device}*"):
                if path.suffix not in (".sock", ".features"):
                    continue
                lane = path.name[len(node.device) : -len(path.suffix)]
                if not lane or (lane[0] == "_" and lane[1:].isdigit()):
                    path.unlink(missing_ok=True)

    def _launch(self, proc: record.Process) -> record.Process:
        self.record.processes.append(proc)
        self.record.checkpoint()
        return proc


def wait_for_proxy(log: pathlib.Path, *, timeout: float = 15) -> None:
    """Returns once the relay writing to log listens in its namespaces."""
    supervisor.wait_until(
        lambda: "ready" in log.read_text(), timeout=timeout, what="the apiserver relay"
    )
