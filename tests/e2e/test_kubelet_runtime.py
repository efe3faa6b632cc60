"""Real nodes: `podwire sandbox up --runtime kubelet`.

Three nodes, each a kubelet and containerd in its own namespaces, register and become Ready
with their pod CIDR; pods are real containers with addresses from their node's CIDR; podwire
comes in by `helm install` of the chart, its agents DaemonSet pods; pods on different nodes
reach each other, and a capture on the underlay proves it encrypted (and, with its control,
that it would see plaintext). `down` leaves no namespace, process, mount, cgroup, file or
changed sysctl. Nothing here is skipped: a missing prerequisite fails the test.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import podstream

from podwire.sandbox import cluster, kubenode, netns, supervisor, tools, verify

PODWIRE = str(pathlib.Path(sys.executable).parent / "podwire")
NODES = 3  # the kubelet_sandbox fixture's


def sysctls() -> dict[str, str]:
    return {
        k: pathlib.Path("/proc/sys", *k.split(".")).read_text().strip()
        for k in kubenode.KUBELET_SYSCTLS
    }


def _host_mounts_naming(directory: pathlib.Path) -> list[str]:
    text = pathlib.Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if str(directory) in line]


def test_real_nodes_ready_pods_containers_podwire_by_helm_encrypted_and_down_leaves_nothing(
    kubelet_sandbox: Any, cli: Any
) -> None:
    before_sysctls, before_paths = kubelet_sandbox.before_sysctls, kubelet_sandbox.before_paths
    _check_running(kubelet_sandbox)
    tag, directory = kubelet_sandbox.state.tag, kubelet_sandbox.directory
    # down, from a process of its own as a user runs it; then nothing is left.
    made = kubelet_sandbox.made()
    started = time.monotonic()
    down = cli(directory, "sandbox", "down")
    print(f"`podwire sandbox down` (kubelet runtime): {time.monotonic() - started:.1f}s")
    assert down.returncode == 0, down.stdout + down.stderr
    kubelet_sandbox.assert_nothing_left(made)
    assert not _host_mounts_naming(directory)
    left = [str(p) for p in pathlib.Path("/sys/fs/cgroup").glob(f"*/podwire-sandbox-{tag}")]
    assert not left, f"cgroups left behind: {left}"
    assert sysctls() == before_sysctls
    # What the chart's host paths and containerd would make on the machine without the nodes'
    # private mounts: none of it appears.
    created = {p for p in kubenode.HOST_PATHS if os.path.lexists(p)} - before_paths
    assert not created, f"made on the machine itself: {created}"


def _check_running(sb: Any) -> None:
    print(f"`podwire sandbox up --runtime kubelet` ({NODES} nodes): {sb.up_seconds:.1f}s")
    st = sb.state
    assert st.runtime == "kubelet"
    # The kubelets set their sysctls in files bound over /proc/sys in their nodes' mount
    # namespaces: the machine's own never change, not even while the sandbox runs.
    assert sysctls() == sb.before_sysctls

    # Nodes registered by their kubelets, Ready, with the pod CIDR the sandbox gave each.
    nodes = {n["metadata"]["name"]: n for n in sb.kubectl_json("get", "nodes")["items"]}
    assert sorted(nodes) == [f"node{i}" for i in range(1, NODES + 1)]
    for i in range(1, NODES + 1):
        n = nodes[f"node{i}"]
        conds = {c["type"]: c["status"] for c in n["status"]["conditions"]}
        assert conds["Ready"] == "True", n["status"]["conditions"]
        assert n["spec"]["podCIDR"] == f"10.244.{i}.0/24"
        info = n["status"]["nodeInfo"]
        assert info["kubeletVersion"] == "v1.34.4"
        assert info["containerRuntimeVersion"].startswith("containerd://")
        addresses = {a["type"]: a["address"] for a in n["status"]["addresses"]}
        assert addresses["InternalIP"] == f"192.0.2.{10 + i}"

    # Pods are containers containerd runs, with addresses from their node's CIDR; the name the
    # sandbox gave each one's network namespace is that pod's (it holds the pod's address).
    pods = sb.kubectl_json("get", "pods", "-l", "podwire.io/sandbox-pod=true")["items"]
    assert len(pods) == 2 * NODES
    by_name = {p["metadata"]["name"]: p for p in pods}
    for pod in st.pods():
        item = by_name[pod.name]
        assert item["status"]["phase"] == "Running"
        assert item["spec"]["nodeName"] == pod.node
        cid = item["status"]["containerStatuses"][0]["containerID"]
        assert cid.startswith("containerd://")
        cidr = ipaddress.ip_network(st.node(pod.node).pod_cidr)
        assert ipaddress.ip_address(pod.ip) in cidr and pod.ip == item["status"]["podIP"]
        addrs = pod.ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f" {pod.ip}/24 " in addrs, addrs

    # podwire by helm: a release, its agents DaemonSet pods, every WireguardNode Ready.
    releases = json.loads(cluster.helm(st, "list", "-n", "default", "-o", "json"))
    assert [(r["name"], r["status"]) for r in releases] == [("podwire", "deployed")]
    ds = sb.kubectl_json("get", "daemonset", "podwire-agent")
    assert ds["status"]["numberReady"] == NODES, ds["status"]
    # The userspace engine in its own DaemonSet (the chart's default for that datapath), so
    # that it outlives the agent's container.
    engines = sb.kubectl_json("get", "daemonset", "podwire-engine")
    assert engines["status"]["numberReady"] == NODES, engines["status"]
    assert not [p for p in st.processes if p.role in ("agent", "operator")]  # pods, not processes
    wgnodes = {w["metadata"]["name"]: w for w in sb.kubectl_json("get", "wgnodes")["items"]}
    assert sorted(wgnodes) == sorted(nodes)
    for w in wgnodes.values():
        conds = {c["type"]: c["status"] for c in w["status"]["conditions"]}
        assert conds["Ready"] == "True" and w["status"]["datapath"] == "userspace"

    # status: every peer has a handshake, every pod reaches every other.
    status = json.loads(sb.cli("sandbox", "status", "-o", "json").stdout)
    assert status["runtime"] == "kubelet"
    for n in status["nodes"]:
        assert sorted(p["node"] for p in n["peers"]) == sorted(set(nodes) - {n["name"]})
    netns.wait_until(
        lambda: all(
            p["latest_handshake"]
            for n in json.loads(sb.cli("sandbox", "status", "-o", "json").stdout)["nodes"]
            for p in n["peers"]
        ),
        timeout=30,
        interval=1,
        what="a handshake with every peer",
    )
    pairs = 2 * NODES * (2 * NODES - 1)
    assert len(status["connectivity"]) == pairs
    assert not [c for c in status["connectivity"] if not c["ok"]]
    assert [(a["node"], a["ready"]) for a in status["agent_pods"]] == [
        (f"node{i}", True) for i in range(1, NODES + 1)
    ]
    mem = status["memory"]
    print(
        f"sandbox memory: {mem['processes_rss_mib']} MiB resident in its processes, "
        f"{mem['containerd_tmpfs_mib']} MiB of images in containerd's tmpfs"
    )
    assert mem["processes_rss_mib"] > 0 and mem["containerd_tmpfs_mib"] > 0
    table = sb.cli("sandbox", "status").stdout
    assert f"{pairs}/{pairs} pod pairs reachable" in table and "AGENT POD" in table

    # verify: only WireGuard crosses the underlay between pods on different nodes; the control
    # (one pair routed around the tunnel) shows the same capture does see plaintext.
    proof = sb.cli("sandbox", "verify", "-o", "json")
    assert proof.returncode == 0, proof.stdout + proof.stderr
    report = json.loads(proof.stdout)
    enc, ctl = report["encrypted"], report["control"]
    assert enc["passed"] and not enc["failures"]
    assert enc["analysis"]["clear"] == 0 and enc["analysis"]["payload"] == 0
    assert enc["analysis"]["wireguard"]["transport"] >= enc["sent"]
    assert ctl["passed"] and ctl["analysis"]["clear"] > 0 and ctl["analysis"]["payload"] > 0

    # The user's own commands reach a real node's agent: its gRPC socket, the device by wg.
    peers = subprocess.run(
        [PODWIRE, "peers", "--socket", str(st.nodes[0].api_socket)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert peers.returncode == 0 and "node2" in peers.stdout and "node3" in peers.stdout, (
        peers.stdout + peers.stderr
    )


def _container_main(node_ns: str, program: str) -> int:
    """The PID of the container process running program on the node's network (the agent's,
    on the host network): the one whose parent is containerd's shim, PID 1 of its container."""
    for pid in netns.pids(node_ns):
        argv = supervisor.cmdline(pid)
        if not any(program in a for a in argv[:3]):
            continue
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if "containerd-shim" in " ".join(supervisor.cmdline(ppid)[:1]):
            return pid
    raise AssertionError(f"no {program} container process in {node_ns}")


def _agent_pods(sb: Any) -> dict[str, dict[str, Any]]:
    items = sb.kubectl_json("get", "pods", "-l", "app.kubernetes.io/component=agent")["items"]
    return {
        p["spec"]["nodeName"]: p for p in items if p["metadata"].get("deletionTimestamp") is None
    }


def _ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return conds.get("Ready") == "True"


def _no_clear_frames(st: Any, frames: list[bytes]) -> None:
    analysis = verify.analyze(frames, [p.ip for p in st.pods()], b"\x00unused\x00", 51871)
    assert analysis.transport > 0, analysis
    assert analysis.clear == 0, analysis.examples


def test_agent_restart_and_agent_upgrade_on_real_nodes_lose_no_packet_nothing_in_clear(
    kubelet_sandbox: Any, ping_stream: Any, tmp_path: pathlib.Path
) -> None:
    sb = kubelet_sandbox
    st = sb.state
    a, b = st.node("node1").pods[0], st.node("node2").pods[0]
    assert a.ns.ping(b.ip, count=3, timeout=5)
    engines_before = {
        p["metadata"]["uid"]
        for p in sb.kubectl_json("get", "pods", "-l", "app.kubernetes.io/component=engine")["items"]
    }

    # 1. The agent's container restarts (its main process killed, as by a crash or an OOM kill)
    # on both ends of a 100 packets-per-second stream: the engines carry on, nothing is lost.
    with verify.Capture(st, tmp_path / "restart.pcap") as cap:
        stream = ping_stream(a, b, count=2000, interval=0.01)
        for node in ("node1", "node2"):
            supervisor.kill(_container_main(st.node(node).netns, "podwire-agent"))
        netns.wait_until(
            lambda: all(
                _ready(p) and p["status"]["containerStatuses"][0]["restartCount"] >= 1
                for n, p in _agent_pods(sb).items()
                if n in ("node1", "node2")
            ),
            timeout=60, interval=0.5, what="the restarted agents Ready",
        )  # fmt: skip
        sent, received, summary = stream.result()
        frames = cap.stop()
    print(f"agent containers restarted under a 100/s stream: {summary}")
    assert sent == 2000 and received == sent, summary
    _no_clear_frames(st, frames)

    # 2. helm upgrade to a new agent image (the same build under a new tag in every node's
    # containerd): the agent DaemonSet rolls node by node, the engines (OnDelete) stay.
    ref = next(iter(_agent_pods(sb).values()))["spec"]["containers"][0]["image"]
    new_tag = ref.rsplit(":", 1)[1] + "-upgrade"
    cp = sb.api.control_plane(st)
    for node in st.nodes:
        tagged = kubenode.KubeNode(st, cp, node).ctr("images", "tag", ref, f"{ref}-upgrade")
        assert tagged.returncode == 0, tagged.stderr
    old_agents = {p["metadata"]["uid"] for p in _agent_pods(sb).values()}
    with verify.Capture(st, tmp_path / "upgrade.pcap") as cap:
        stream = ping_stream(a, b, count=4000, interval=0.01)
        cluster.helm(st, "upgrade", "podwire", str(cluster.CHART), "--namespace", "default",
                     "--reuse-values", f"--set-string=image.tag={new_tag}")  # fmt: skip
        cp.kubectl("rollout", "status", "daemonset/podwire-agent", "--timeout=120s", timeout=130)
        sent, received, summary = stream.result()
        frames = cap.stop()
    print(f"helm upgrade of the agents under a 100/s stream: {summary}")
    agents = _agent_pods(sb)
    assert not old_agents & {p["metadata"]["uid"] for p in agents.values()}  # all replaced
    assert all(p["spec"]["containers"][0]["image"].endswith(new_tag) for p in agents.values())
    engines_after = {
        p["metadata"]["uid"]
        for p in sb.kubectl_json("get", "pods", "-l", "app.kubernetes.io/component=engine")["items"]
    }
    assert engines_after == engines_before  # the engines were never restarted
    assert sent == 4000 and received == sent, summary
    _no_clear_frames(st, frames)


def test_a_failed_up_of_real_nodes_names_the_step_and_leaves_nothing(
    tmp_path: pathlib.Path, nothing_left: Any
) -> None:
    """A kubelet that cannot start, after each node's mount namespace and containerd (with the
    images) are up: `up` fails naming the step, and what it made is gone, containerd's and the
    pods' cgroups included."""
    assert os.geteuid() == 0, "the kubelet runtime needs root (namespaces, mounts, cgroups)"
    kubenode.check_prerequisites()
    tools_bin = tmp_path / "tools"
    tools_bin.mkdir()
    for tool in tools.BUILT.iterdir():
        (tools_bin / tool.name).symlink_to(tool)
    (tools_bin / "kubelet").unlink()
    (tools_bin / "kubelet").write_text("#!/bin/sh\necho 'this kubelet cannot start' >&2\nexit 3\n")
    (tools_bin / "kubelet").chmod(0o755)
    directory = tmp_path / "sandbox"
    before = sysctls()
    cgroups_before = set(pathlib.Path("/sys/fs/cgroup").glob("*/podwire-sandbox-*"))
    env = {**os.environ, "PODWIRE_SANDBOX_DIR": str(directory), "PODWIRE_TOOLS_BIN": str(tools_bin)}
    done = subprocess.run(
        [PODWIRE, "sandbox", "up", "--runtime", "kubelet", "--nodes", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    out, err = done.stdout, done.stderr
    assert done.returncode == 1, out + err
    assert "step 'nodes' failed" in err or "step 'Nodes Ready' failed" in err, err
    assert "kubelet" in err and "removed" in err, err
    assert "starting containerd, the images and a kubelet on 2 nodes" in out
    nothing_left(directory)
    assert not _host_mounts_naming(directory)
    left = set(pathlib.Path("/sys/fs/cgroup").glob("*/podwire-sandbox-*")) - cgroups_before
    assert not left, f"cgroups left behind: {left}"
    assert sysctls() == before


def _podwire_on(node: Any) -> dict[str, list[str]]:
    """What of podwire's `ip` shows in a node's namespace: its links (every lane's), routes of
    its protocol in any table of either family, its rules."""
    ns = node.ns
    links = [
        line
        for line in ns.ip("-d", "-o", "link", "show").stdout.splitlines()
        if f" {cluster.CHART_DEVICE}" in line
    ]
    routes = [
        line
        for family in ("-4", "-6")
        for line in ns.ip(family, "route", "show", "table", "all").stdout.splitlines()
        if "proto 251" in line or cluster.CHART_DEVICE in line
    ]
    rules = [
        line
        for family in ("-4", "-6")
        for line in ns.ip(family, "rule", "show").stdout.splitlines()
        if line.startswith(("5200:", "5210:"))
    ]
    return {"links": links, "routes": routes, "rules": rules}


def test_helm_uninstall_leaves_nothing_of_podwire_on_the_nodes_but_the_key_folder(
    kubelet_sandbox: Any,
) -> None:
    st = kubelet_sandbox.state
    nodes = [st.node(f"node{i}") for i in range(1, NODES + 1)]
    for node in nodes:  # the control: what the uninstall must take away is there
        made = _podwire_on(node)
        assert made["links"] and made["rules"], made
        assert any(line.startswith("unreachable 10.244.0.0/16") for line in made["routes"]), made
    started = time.monotonic()
    out = cluster.helm(st, "uninstall", "podwire", "--namespace", "default", "--wait",
                       "--timeout", "180s", timeout=240)  # fmt: skip
    print(f"`helm uninstall` on real nodes: {time.monotonic() - started:.1f}s")
    assert 'release "podwire" uninstalled' in out
    netns.wait_until(
        lambda: (
            not kubelet_sandbox.kubectl_json("get", "pods", "-l", "app.kubernetes.io/name=podwire")[
                "items"
            ]
        ),
        timeout=120,
        interval=1,
        what="podwire's pods gone",
    )
    for node in nodes:
        assert _podwire_on(node) == {"links": [], "routes": [], "rules": []}, node.name
        key = pathlib.Path(f"/proc/{node.mounts_pid}/root/var/lib/podwire/private.key")
        assert key.exists(), f"{node.name}: the key folder must stay"
    # The hook's Job, its ServiceAccount and ClusterRole went with it (hook-succeeded).
    jobs = kubelet_sandbox.kubectl_json("get", "jobs")["items"]
    assert not [j for j in jobs if "uninstall" in j["metadata"]["name"]]


def _ask_proxy(sock: pathlib.Path, request: bytes) -> bytes:
    """What the kubelet proxy answers to request."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(request)
        return s.recv(4096)


def _connect_through(sock: pathlib.Path, target: str) -> bytes:
    """What the kubelet proxy answers to `CONNECT target`."""
    return _ask_proxy(sock, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())


def test_kubectl_logs_and_exec_reach_every_agent_pod_on_real_nodes(kubelet_sandbox: Any) -> None:
    """An operator's first moves when a pod misbehaves: its log, a command inside it. The
    apiserver reaches each kubelet through the sandbox's CONNECT proxy and checks the kubelet's
    serving certificate (from the sandbox's CA, for the node's address)."""
    sb = kubelet_sandbox
    st = sb.state
    print(f"`podwire sandbox up --runtime kubelet` ({NODES} nodes): {sb.up_seconds:.1f}s")
    cp = sb.api.control_plane(st)
    agents = _agent_pods(sb)
    assert sorted(agents) == [f"node{i}" for i in range(1, NODES + 1)]
    for node, pod in sorted(agents.items()):
        name = pod["metadata"]["name"]
        started = time.monotonic()
        logs = cp.kubectl("logs", "-n", "default", name, "-c", "agent", check=False)
        took = time.monotonic() - started
        assert logs.returncode == 0, f"kubectl logs {name}: {logs.stderr}"
        # The agent's own structured log: the device it brought up on this node.
        events = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith("{")]
        assert any(e.get("event") == "device_ready" for e in events), logs.stdout[-2000:]
        status = cp.kubectl("exec", "-n", "default", name, "-c", "agent", "--",
                            "podwire", "status", check=False)  # fmt: skip
        assert status.returncode == 0, f"kubectl exec {name} -- podwire status: {status.stderr}"
        assert f"node:        {node}" in status.stdout, status.stdout
        assert f"peers:       {NODES - 1}" in status.stdout, status.stdout
        print(f"{node}: kubectl logs {took:.2f}s, {len(events)} log lines; exec podwire status ok")
    # The guide `up` prints names both, and they work as it gives them.
    for line in (
        "kubectl logs ds/podwire-agent",
        "kubectl exec ds/podwire-agent -- podwire status",
    ):
        assert line in sb.up_output, sb.up_output
        done = cp.kubectl(*line.split()[1:], check=False)
        assert done.returncode == 0 and done.stdout.strip(), (line, done.stderr)
    # exec with stdin both ways (a shell's session): what goes in comes back out.
    name = agents["node2"]["metadata"]["name"]
    echoed = cp.kubectl("exec", "-i", "-n", "default", name, "-c", "agent", "--", "cat",
                        input="podwire-exec-stdin\n", check=False)  # fmt: skip
    assert echoed.returncode == 0 and echoed.stdout == "podwire-exec-stdin\n", echoed
    # The engine's pod too (its own DaemonSet): its log names its device.
    engines = sb.kubectl_json("get", "pods", "-l", "app.kubernetes.io/component=engine")["items"]
    assert len(engines) == NODES
    engine_log = cp.kubectl("logs", "-n", "default", engines[0]["metadata"]["name"], check=False)
    assert engine_log.returncode == 0 and cluster.CHART_DEVICE in engine_log.stdout, engine_log

    # The proxy reaches the nodes' kubelets and nothing else: not the machine's loopback (the
    # apiserver, etcd), not an address no node has.
    sock = cluster.kubelet_proxy_socket(st)
    assert sock.stat().st_mode & 0o777 == 0o600
    # Bad requests end only their own connection; the proxy serves the next one.
    for bad in (b"GET / HTTP/1.1\r\n\r\n", b"CONNECT nonsense HTTP/1.1\r\n\r\n",
                b"CONNECT 192.0.2.11:99999999 HTTP/1.1\r\n\r\n", b"\xff\xfe\r\n\r\n"):  # fmt: skip
        assert _ask_proxy(sock, bad).startswith((b"HTTP/1.1 400", b"HTTP/1.1 502")), bad
    reply = _connect_through(sock, f"{st.nodes[0].underlay_ip}:10250")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    for target in (f"127.0.0.1:{st.apiserver_port}", "192.0.2.250:10250"):
        assert _connect_through(sock, target).startswith(b"HTTP/1.1 403"), target


def _http_status(node: Any, port: int, path: str = "/metrics") -> int:
    """The HTTP status of path on the node's own network at port (0: nothing answers)."""
    script = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5).status)\n"
        "except OSError:\n"
        "    print(0)\n"
    )
    return int(node.ns.run(sys.executable, "-c", script, check=False).stdout.strip() or 0)


def _device_mtu(node: Any) -> int:
    out = node.ns.ip("-o", "link", "show", "dev", cluster.CHART_DEVICE).stdout
    return int(out.split(" mtu ", 1)[1].split()[0])


def test_helm_upgrade_with_changed_values_rolls_the_agents_out_and_they_take_them(
    kubelet_sandbox: Any, tmp_path: pathlib.Path
) -> None:
    """`helm upgrade --reuse-values` with the agents' metrics port and MTU changed, under a 100
    packets-per-second stream between pods on different nodes: every agent pod is replaced,
    the new port answers (and the old does not), the devices and `podwire status` have the new
    MTU, the pods stay reachable and nothing crosses in clear."""
    sb = kubelet_sandbox
    st = sb.state
    cp = sb.api.control_plane(st)
    old_port, new_port, new_mtu = 9871, 9881, 1380
    nodes = [st.node(f"node{i}") for i in range(1, NODES + 1)]
    for node in nodes:  # the control: the values in force before
        assert _http_status(node, old_port) == 200 and _http_status(node, new_port) == 0
        assert _device_mtu(node) != new_mtu
    old_agents = {p["metadata"]["uid"] for p in _agent_pods(sb).values()}
    a, b = st.node("node1").pods[0], st.node("node2").pods[0]
    with podstream.PodStream(st, a, b, tmp_path / "values.pcap", count=3000) as stream:
        started = time.monotonic()
        cluster.helm(st, "upgrade", "podwire", str(cluster.CHART), "--namespace", "default",
                     "--reuse-values", f"--set=agent.metricsPort={new_port}",
                     f"--set=agent.mtu={new_mtu}")  # fmt: skip
        cp.kubectl("rollout", "status", "daemonset/podwire-agent", "--timeout=120s", timeout=130)
        rolled = time.monotonic() - started
        seen = stream.result()
    print(f"helm upgrade (metrics port {old_port}->{new_port}, MTU {new_mtu}), rolled out in "
          f"{rolled:.1f}s, under a 100/s stream: {seen.describe()}")  # fmt: skip
    agents = _agent_pods(sb)
    assert not old_agents & {p["metadata"]["uid"] for p in agents.values()}  # all replaced
    for node in nodes:
        assert _http_status(node, new_port) == 200, node.name
        assert _http_status(node, old_port) == 0, node.name
        assert _device_mtu(node) == new_mtu, node.name
        name = agents[node.name]["metadata"]["name"]
        status = cp.kubectl("exec", "-n", "default", name, "-c", "agent", "--", "podwire", "status")
        assert f"mtu:         {new_mtu}" in status.stdout, status.stdout
    assert seen.sent == 3000 and seen.received == seen.sent, seen.describe()
    assert seen.longest_gap < 2.0, seen.describe()  # never held up either
    assert seen.analysis.clear == 0 and seen.analysis.payload == 0, seen.analysis.examples
    assert seen.analysis.transport >= seen.sent
    # Every pod still reaches every other (status runs them all).
    status = json.loads(sb.cli("sandbox", "status", "-o", "json").stdout)
    assert not [c for c in status["connectivity"] if not c["ok"]]


ENGINE_PINGS = 2000  # 20 s at 100 a second; node2's engine pod is deleted after 2 s


def _engine_pods(sb: Any) -> dict[str, dict[str, Any]]:
    items = sb.kubectl_json("get", "pods", "-l", "app.kubernetes.io/component=engine")["items"]
    return {
        p["spec"]["nodeName"]: p for p in items if p["metadata"].get("deletionTimestamp") is None
    }


def test_engine_upgrade_on_real_nodes_is_a_measured_fail_closed_gap_then_traffic_resumes(
    kubelet_sandbox: Any, tmp_path: pathlib.Path
) -> None:
    """The engine's own upgrade as the chart has it (its DaemonSet is OnDelete): `helm upgrade`
    to a new image leaves every engine running; deleting node2's engine pod starts the new one.
    Meanwhile 100 pings a second go from a pod on node1 to one on node2, captured on the
    underlay: the gap is measured, nothing crosses in clear, and the traffic comes back."""
    sb = kubelet_sandbox
    st = sb.state
    cp = sb.api.control_plane(st)
    ref = next(iter(_engine_pods(sb).values()))["spec"]["containers"][0]["image"]
    new_tag = ref.rsplit(":", 1)[1] + "-engine2"
    for node in st.nodes:  # the same build under a new tag in every node's containerd
        tagged = kubenode.KubeNode(st, cp, node).ctr("images", "tag", ref, f"{ref}-engine2")
        assert tagged.returncode == 0, tagged.stderr
    engines = {n: p["metadata"]["uid"] for n, p in _engine_pods(sb).items()}
    cluster.helm(st, "upgrade", "podwire", str(cluster.CHART), "--namespace", "default",
                 "--reuse-values", f"--set-string=image.tag={new_tag}")  # fmt: skip
    cp.kubectl("rollout", "status", "daemonset/podwire-agent", "--timeout=120s", timeout=130)
    # OnDelete: the upgrade replaced the agents, and no engine.
    assert {n: p["metadata"]["uid"] for n, p in _engine_pods(sb).items()} == engines
    a, b = st.node("node1").pods[0], st.node("node2").pods[0]
    assert a.ns.ping(b.ip, count=3, timeout=5)
    old = _engine_pods(sb)["node2"]["metadata"]["name"]
    with podstream.PodStream(st, a, b, tmp_path / "engine.pcap", count=ENGINE_PINGS) as stream:
        time.sleep(2)
        deleted = time.monotonic()
        cp.kubectl("delete", "pod", "-n", "default", old, "--timeout=60s", timeout=70)
        netns.wait_until(
            lambda: "node2" in (e := _engine_pods(sb)) and _ready(e["node2"]),
            timeout=60, interval=0.2, what="node2's new engine pod Ready",
        )  # fmt: skip
        replaced = time.monotonic() - deleted
        seen = stream.result()
    print(f"engine upgrade on node2 (pod deleted, new pod Ready in {replaced:.1f}s) under a "
          f"100/s stream: {seen.describe()}")  # fmt: skip
    now = _engine_pods(sb)
    assert now["node2"]["metadata"]["uid"] != engines["node2"]
    assert now["node2"]["spec"]["containers"][0]["image"].endswith(new_tag)
    assert {n: now[n]["metadata"]["uid"] for n in ("node1", "node3")} == {
        n: engines[n] for n in ("node1", "node3")
    }  # the other nodes' engines were left alone
    # Fail-closed throughout: no pod address, no payload in clear, not even in the gap.
    assert seen.analysis.clear == 0 and seen.analysis.payload == 0, seen.analysis.examples
    # The traffic came back: every one of the last 3 s of requests had its reply.
    assert seen.sent == ENGINE_PINGS
    assert not [n for n in seen.lost if n > ENGINE_PINGS - 300], seen.describe()
    assert seen.longest_gap < 15, seen.describe()
