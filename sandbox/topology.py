"""Nodes as network namespaces on one underlay bridge, pods as namespaces behind their node.

    ns <prefix>ul:  bridge br0 (no address: a switch)
        |                    |                      |
    node1 eth0 192.0.2.11    node2 eth0 192.0.2.12  ...   (InternalIP, the underlay)
    cbr0 10.244.1.1/24       cbr0 10.244.2.1/24           (the node's pod bridge)
      |        |               |        |
    pod 10.244.1.10  .11     pod 10.244.2.10  .11

Each node is a Node object with that InternalIP and pod CIDR, and runs one podwire-agent in its
namespace; the apiserver on the host's loopback is reached through sandbox.apiproxy. Used by
the agent's integration tests and by the sandbox.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pathlib
import subprocess
import sys

from podwire.sandbox import controlplane, netns

UNDERLAY = ipaddress.ip_network("192.0.2.0/24")
POD_SUPERNET = ipaddress.ip_network("10.244.0.0/16")
LISTEN_PORT = 51871
BIN = pathlib.Path(sys.executable).parent


@dataclasses.dataclass
class Pod:
    name: str
    ns: netns.Netns
    ip: str
    node: str


@dataclasses.dataclass
class Node:
    name: str
    index: int
    ns: netns.Netns
    underlay_ip: str
    pod_cidr: str
    device: str
    workdir: pathlib.Path
    pods: list[Pod] = dataclasses.field(default_factory=list)
    agent: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None

    @property
    def api_socket(self) -> pathlib.Path:
        return self.workdir / "agent.sock"

    @property
    def key_path(self) -> pathlib.Path:
        return self.workdir / "private.key"


class Cluster:
    def __init__(
        self,
        factory: netns.NetnsFactory,
        cp: controlplane.ControlPlane,
        workdir: pathlib.Path,
        *,
        underlay: netns.Netns | None = None,
        bridge: str = "br0",
    ) -> None:
        """A new underlay, or (given `underlay`) the one a previous process made."""
        self.factory = factory
        self.cp = cp
        self.workdir = workdir
        self.nodes: dict[str, Node] = {}
        if underlay is None:
            self.underlay = factory.namespace("ul")
            self.bridge = factory.bridge(self.underlay, name=bridge)
        else:
            self.underlay, self.bridge = underlay, bridge

    # -- nodes and pods ----------------------------------------------------------------------

    def add_node(
        self, name: str, *, index: int | None = None, pods: int = 2, create_object: bool = True
    ) -> Node:
        index = index if index is not None else len(self.nodes) + 1
        ns = self.factory.namespace("n")
        underlay_ip = str(UNDERLAY.network_address + 10 + index)
        eth, port = self.factory.unique("e"), self.factory.unique("p")
        self.factory.veth(
            ns, self.underlay, a_name=eth, b_name=port, a_addr=f"{underlay_ip}/{UNDERLAY.prefixlen}"
        )
        self.underlay.ip("link", "set", port, "master", self.bridge)
        pod_net = ipaddress.ip_network(f"10.244.{index}.0/24")
        ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns.ip("link", "add", "cbr0", "type", "bridge")
        ns.ip("addr", "add", f"{pod_net.network_address + 1}/24", "dev", "cbr0")
        ns.ip("link", "set", "cbr0", "up")
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        node = Node(name, index, ns, underlay_ip, str(pod_net), self.factory.unique("w"), workdir)
        for k in range(pods):
            self._add_pod(node, k)
        self.nodes[name] = node
        if create_object:
            self.create_node_object(node)
        return node

    def _add_pod(self, node: Node, k: int) -> None:
        pod_ns = self.factory.namespace("p")
        ip = str(ipaddress.ip_network(node.pod_cidr).network_address + 10 + k)
        inside, outside = self.factory.unique("c"), self.factory.unique("h")
        self.factory.veth(pod_ns, node.ns, a_name=inside, b_name=outside, a_addr=f"{ip}/24")
        node.ns.ip("link", "set", outside, "master", "cbr0")
        pod_ns.ip(
            "route",
            "add",
            "default",
            "via",
            str(ipaddress.ip_network(node.pod_cidr).network_address + 1),
        )
        node.pods.append(Pod(f"{node.name}-pod{k}", pod_ns, ip, node.name))

    def node_object(
        self, node: Node, *, internal_ip: str | None = None, pod_cidrs: list[str] | None = None
    ) -> dict:
        addresses = [{"type": "Hostname", "address": node.name}]
        ip = node.underlay_ip if internal_ip is None else internal_ip
        if ip:
            addresses.insert(0, {"type": "InternalIP", "address": ip})
        cidrs = [node.pod_cidr] if pod_cidrs is None else pod_cidrs
        spec: dict = {"podCIDRs": cidrs}
        if cidrs:
            spec["podCIDR"] = cidrs[0]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": {"podwire.io/sandbox": "true"}},
            "spec": spec,
            "status": {"addresses": addresses},
        }

    def create_node_object(self, node: Node, **kwargs: object) -> None:
        obj = self.node_object(node, **kwargs)  # type: ignore[arg-type]
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        # A Node's status is its own subresource: what kubelet reports, we report here.
        self.cp.kubectl(
            "patch", "node", node.name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": obj["status"]}),
        )  # fmt: skip

    def delete_node(self, name: str) -> None:
        self.cp.kubectl("delete", "node", name, "--wait=false")

    def remove_node_network(self, node: Node) -> None:
        """Deletes the node's namespace and its pods' (their links go with them)."""
        for pod in node.pods:
            self.factory.delete_namespace(pod.ns)
        self.factory.delete_namespace(node.ns)
        self.nodes.pop(node.name, None)

    # -- agents ------------------------------------------------------------------------------

    def proxy_command(self, node: Node) -> tuple[list[str], pathlib.Path]:
        """The relay's command line (run on the host) and its log."""
        port = str(self.cp.apiserver_port)
        argv = [sys.executable, "-m", "podwire.sandbox.apiproxy", "--port", port, node.ns.name]
        return argv, node.workdir / "apiproxy.log"

    def _ensure_proxy(self, node: Node) -> None:
        """One relay per node, so that adding a node never breaks another node's watches."""
        if node.proxy is not None and node.proxy.poll() is None:
            return
        argv, log = self.proxy_command(node)
        log.write_text("")
        node.proxy = self.factory.spawn(None, argv, log_path=log)
        wait_for_proxy(log)

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

    def agent_command(self, node: Node) -> tuple[list[str], pathlib.Path]:
        """The agent's command line (run in the node's namespace) and its log."""
        return [str(BIN / "podwire-agent")], node.workdir / "agent.log"

    def start_agent(self, node: Node, **kwargs: object) -> subprocess.Popen[bytes]:
        self._ensure_proxy(node)
        env = {**os.environ, **self.agent_env(node, **kwargs)}  # type: ignore[arg-type]
        argv, log = self.agent_command(node)
        node.agent = self.factory.spawn(node.ns, argv, log_path=log, env=env)
        return node.agent

    def stop_agent(self, node: Node) -> None:
        if node.agent is not None:
            netns.stop_process(node.agent)
            self.factory.processes.remove(node.agent)
            node.agent = None


def wait_for_proxy(log: pathlib.Path, *, timeout: float = 15) -> None:
    """Returns once the relay writing to log listens in its namespaces."""
    netns.wait_until(
        lambda: "ready" in log.read_text(), timeout=timeout, what="the apiserver relay"
    )
