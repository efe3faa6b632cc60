"""Real Kubernetes nodes for the sandbox (`podwire sandbox up --runtime kubelet`).

Each node of sandbox.topology (a network namespace on the underlay) gets a mount namespace of
its own, held by one small process ("node-mounts") and entered with nsenter, never with
`ip netns exec` (which remounts /sys and hides the cgroup mounts):

    /run, /var/lib, /var/log   bound from the node's folder: containerd's socket and state, the
                               kubelet's hard-coded paths, CNI's leases, pods' netns pins and
                               every hostPath a chart asks for stay the node's, never the machine's
    the sandbox folder         bound back in, so that the configurations stay readable

containerd (runc, cgroupfs) and a kubelet run in it; the bridge CNI plugin gives each pod an
address from its node's pod CIDR (set on the Node before the kubelet registers it). The kubelet
reaches the apiserver through the node's relay (sandbox.apiproxy) as system:node:<name>; a pod
on the node's network reaches the in-cluster address 10.96.0.1:443 through one DNAT rule. The
apiserver reaches the kubelet (`kubectl logs`, `exec`) the other way, through the sandbox's
CONNECT proxy (sandbox.kubeletproxy), and checks its serving certificate, which the sandbox's CA
signed for the node's address.

The kubelets' cgroups live under one root per node, made here in every v1 controller; the
global sysctls a kubelet sets are read first and written back by restore(). Everything is
written into the sandbox's record as it is made, so that `down` removes exactly that.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import pathlib
import shlex
import subprocess

from podwire.sandbox import certs, controlplane, record, supervisor, tools

CGROUP_BASE = pathlib.Path("/sys/fs/cgroup")
CNI_BIN = pathlib.Path("/usr/lib/cni")
PAUSE_ARCHIVE = tools.REPO / ".cache" / "tools" / "pause" / "pause.tar"
PAUSE_IMAGE = "podwire.local/pause:3.10"  # what hack/tools/build.sh names it
IMAGE_CURRENT = tools.REPO / ".cache" / "image" / "current"  # hack/image.sh: REF= ARCHIVE= HASH=
# What a kubelet writes on the machine (not per namespace) when protectKernelDefaults is off.
# A kubelet sets them to these values. Each node gets files of its own bound over them (a
# panic on oops would take down a machine others share): the machine's stay as they are.
KUBELET_WANTS = {
    "vm.overcommit_memory": "1",
    "vm.panic_on_oom": "0",
    "kernel.panic": "10",
    "kernel.panic_on_oops": "1",
    "kernel.keys.root_maxkeys": "1000000",
    "kernel.keys.root_maxbytes": "25000000",
}
KUBELET_SYSCTLS = tuple(KUBELET_WANTS)
PRIVATE = ("/run", "/var/lib", "/var/log")
# What a node's kubelet, containerd and the chart's pods would make on the machine itself without
# the private mounts above (the tests check that none appears).
HOST_PATHS = (
    "/var/lib/podwire", "/var/run/podwire", "/var/run/wireguard/podwire_wg0.sock",
    "/opt/containerd", "/var/lib/kubelet", "/var/lib/containerd", "/var/lib/cni",
    "/var/log/pods", "/var/log/containers", "/run/containerd",
)  # fmt: skip
START_TIMEOUT = 60.0
CONTAINERD_TMPFS = "4g"  # an upper bound; a node holds each image about twice (blobs, unpacked)
# The helper commands a node needs, and the Debian package of each.
NEEDS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "iptables": "iptables",
}


class NodeError(RuntimeError):
    """A node's containerd or kubelet did not come up; the message says which and where to look."""


def check_prerequisites() -> None:
    """Raises NodeError naming every missing component and how to install it."""
    missing = []
    for cmd, package in NEEDS.items():
        try:
            tools.path(cmd)
        except tools.ToolMissing:
            missing.append(f"{cmd} (apt-get install {package})")
    for cmd in ("kubelet", "kube-controller-manager", "kube-scheduler"):
        try:
            tools.path(cmd)
        except tools.ToolMissing:
            missing.append(f"{cmd} (hack/tools/build.sh kubenode)")
    if not (CNI_BIN / "bridge").exists():
        missing.append(f"{CNI_BIN}/bridge (apt-get install containernetworking-plugins)")
    if not PAUSE_ARCHIVE.exists():
        missing.append(f"{PAUSE_ARCHIVE} (hack/tools/build.sh pause)")
    if missing:
        raise NodeError("the kubelet runtime needs: " + ", ".join(missing))


def pod_image() -> tuple[str, pathlib.Path]:
    """The podwire image hack/image.sh made (its reference and docker-archive); the pause image
    when there is none yet, so that pods are still real containers."""
    try:
        lines = IMAGE_CURRENT.read_text().splitlines()
    except FileNotFoundError:
        return PAUSE_IMAGE, PAUSE_ARCHIVE
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    ref, archive = fields.get("REF", ""), pathlib.Path(fields.get("ARCHIVE", ""))
    if not ref or not archive.is_file():
        raise NodeError(f"{IMAGE_CURRENT} names no image archive that exists: run hack/image.sh")
    return ref, archive


def keep_image(directory: pathlib.Path) -> tuple[str, pathlib.Path]:
    """pod_image(), read once for the whole `up`, its archive linked into directory: a new
    image built meanwhile (hack/image.sh replaces .cache/image/current) changes nothing in a
    sandbox that has begun importing this one."""
    ref, archive = pod_image()
    directory.mkdir(parents=True, exist_ok=True)
    kept = directory / archive.name
    try:
        os.link(archive, kept)
    except OSError:  # another filesystem: the archive where it is
        return ref, archive
    return ref, kept


# -- the machine's settings ----------------------------------------------------------------------


def save_sysctls(st: record.Record) -> None:
    """Reads the global sysctls a kubelet changes, once, before the first kubelet runs."""
    if st.sysctls:
        return
    for key in KUBELET_SYSCTLS:
        path = pathlib.Path("/proc/sys", *key.split("."))
        with contextlib.suppress(OSError):
            st.sysctls[key] = path.read_text().strip()
    st.checkpoint()


def restore_sysctls(st: record.Record) -> list[str]:
    """Writes back what save_sysctls read; returns the keys it could not write."""
    failed = []
    for key, value in st.sysctls.items():
        path = pathlib.Path("/proc/sys", *key.split("."))
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError:
            failed.append(key)
    return failed


def make_cgroup_root(st: record.Record, node: record.Node) -> str:
    """A cgroup for the node's kubelet (its cgroupRoot) in every v1 controller, cpuset filled
    from its parent (an empty cpuset takes no task); recorded before it is made."""
    root = f"/podwire-sandbox-{st.tag}/{node.name}"
    if root not in st.cgroups:
        st.cgroups.append(root)
        st.checkpoint()
    for controller in v1_controllers():
        parent = CGROUP_BASE / controller
        for part in pathlib.PurePosixPath(root).parts[1:]:
            child = parent / part
            child.mkdir(exist_ok=True)
            if controller == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (child / f).read_text().strip():
                        (child / f).write_text((parent / f).read_text())
            parent = child
    return root


def v1_controllers() -> list[str]:
    """The cgroup v1 hierarchies mounted under /sys/fs/cgroup (not the cgroup2 one)."""
    return hierarchies(("cgroup",))


def hierarchies(types: tuple[str, ...] = ("cgroup", "cgroup2")) -> list[str]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, by folder name: on a hybrid
    machine the kubelet and runc also make their cgroups in the cgroup2 one ("unified")."""
    out = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] in types and fields[4].startswith(str(CGROUP_BASE) + "/"):
            out.append(fields[4][len(str(CGROUP_BASE)) + 1 :])
    return out


def cgroup_pids(root: str) -> list[int]:
    """Every process in root or below, in any v1 controller."""
    found: set[int] = set()
    for controller in hierarchies():
        top = CGROUP_BASE / controller / root.lstrip("/")
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
    return sorted(found)


def remove_cgroups(st: record.Record) -> list[str]:
    """Ends every process left in the sandbox's cgroups (pods' containers) and removes the
    cgroups, deepest first; returns those it could not remove."""
    left = []
    tops = {pathlib.PurePosixPath(r).parts[1] for r in st.cgroups if r.startswith("/")}
    for root in st.cgroups:
        for pid in cgroup_pids(root):
            supervisor.kill(pid)
    for top in tops:
        for controller in hierarchies():
            base = CGROUP_BASE / controller / top
            if not base.is_dir():
                continue
            try:
                supervisor.wait_until(
                    functools.partial(_rmdir_tree, base),
                    timeout=10,
                    interval=0.1,
                    what=f"{base} removed",
                )
            except TimeoutError:
                left.append(str(base))
    return left


def _rmdir_tree(base: pathlib.Path) -> bool:
    """rmdir of every cgroup under base, deepest first, then base; True once base is gone."""
    dirs = sorted((d for d in base.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
    for d in [*dirs, base]:
        with contextlib.suppress(OSError):
            d.rmdir()
    return not base.exists()


# -- one node --------------------------------------------------------------------------------


class KubeNode:
    """One node's configuration files, mount namespace, containerd and kubelet."""

    def __init__(self, st: record.Record, cp: controlplane.ControlPlane, node: record.Node) -> None:
        self.st, self.cp, self.node = st, cp, node
        self.dir = node.workdir
        self.root = self.dir / "root"  # what is bound over /run, /var/lib, /var/log

    # files

    def write_config(self, cgroup_root: str) -> None:
        for sub in ("run", "var-lib", "var-log", "cni"):
            (self.root / sub if sub != "cni" else self.dir / sub).mkdir(
                parents=True, exist_ok=True, mode=0o755
            )
        net = ipaddress.ip_network(self.node.pod_cidr)
        gateway = str(net.network_address + 1)
        cni = {
            "cniVersion": "1.0.0",
            "name": "podwire-sandbox",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(net), "gateway": gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }
            ],
        }
        (self.dir / "cni" / "10-podwire-sandbox.conflist").write_text(json.dumps(cni, indent=2))
        self.containerd_config().write_text(
            f"""version = 2
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
# Its default, /opt/containerd, would be made on the machine itself.
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # runc may not lower oom_score_adj here: without this it fails with "can't get final
  # child's PID from pipe".
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.dir / "cni"}"
"""
        )
        pki = self.cp.workdir / "pki"
        cert, key = certs.client(pki, f"kubelet-{self.node.name}", f"system:node:{self.node.name}",
                                 "system:nodes")  # fmt: skip
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "c", "cluster": {"server": self.cp.url, "certificate-authority": str(pki / "ca.crt")}}
            ],
            "users": [{"name": "u", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }  # fmt: skip
        serving_cert, serving_key = certs.serving(
            pki, f"kubelet-serving-{self.node.name}", self.node.name, [self.node.underlay_ip]
        )
        fd = os.open(self.dir / "kubelet.kubeconfig", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(kubeconfig, f)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node.underlay_ip,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            # Served with a certificate from the sandbox's CA for the node's address, which the
            # apiserver checks; only clients with one from that CA get in, and the apiserver
            # decides what each may do (the apiserver's own client, for logs and exec, may).
            "tlsCertFile": str(serving_cert),
            "tlsPrivateKeyFile": str(serving_key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": cgroup_root,
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "resolvConf": "/etc/resolv.conf",
            "maxPods": 30,
            "serializeImagePulls": False,
            # A disposable node on a shared disk: no eviction, no image garbage collection.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "protectKernelDefaults": False,
            "nodeStatusUpdateFrequency": "5s",
            "logging": {"verbosity": 1},
        }  # fmt: skip
        (self.dir / "kubelet.yaml").write_text(json.dumps(config, indent=2))

    def containerd_config(self) -> pathlib.Path:
        return self.dir / "containerd.toml"

    # processes

    def enter(self, *argv: str) -> list[str]:
        """argv inside the node's network and mount namespaces."""
        return [tools.path("nsenter"), f"--target={self.node.mounts_pid}", "--mount", "--net",
                *argv]  # fmt: skip

    def start_mounts(self) -> record.Process:
        """The process that holds the node's mount namespace, once its mounts are made."""
        sandbox = pathlib.Path(self.st.directory)
        # Every source is named through the sandbox folder held open as fd 3: the folder may lie
        # under a path bound over (/run by default), which would hide it after that bind.
        here = f"/proc/self/fd/3/{self.dir.relative_to(sandbox)}"
        sysctls = self.dir / "sysctl"
        sysctls.mkdir(exist_ok=True)
        binds = []
        for key, value in KUBELET_WANTS.items():
            (sysctls / key).write_text(value + "\n")
            binds.append((f"{here}/sysctl/{key}", f"/proc/sys/{key.replace('.', '/')}"))
        for src, dst in zip(("run", "var-lib", "var-log"), PRIVATE, strict=True):
            binds.append((f"{here}/root/{src}", dst))
        script = (
            f"set -eu; exec 3<{shlex.quote(str(sandbox))}; "
            # --no-canonicalize: mount would otherwise turn /proc/self/fd/3 into the folder's
            # path, which names what now covers it.
            + "".join(
                f"mount --no-canonicalize --bind {shlex.quote(a)} {shlex.quote(b)}; "
                for a, b in binds
            )
            + f"mkdir -p {shlex.quote(str(sandbox))}; "
            f"mount --no-canonicalize --bind /proc/self/fd/3 {shlex.quote(str(sandbox))}; "
            "exec 3<&-; "
            # containerd's images and snapshots in memory: a disk write of every image twice
            # per node, and as long to delete it, made `up` and `down` slow.
            "mkdir -p /var/lib/containerd; "
            f"mount -t tmpfs -o mode=0711,size={CONTAINERD_TMPFS} tmpfs /var/lib/containerd; "
            "echo ready; exec sleep infinity"
        )
        argv = [
            tools.path("nsenter"), f"--net=/var/run/netns/{self.node.netns}",
            tools.path("unshare"), "--mount", "--propagation", "slave", "sh", "-c", script,
        ]  # fmt: skip
        log = self.dir / "node-mounts.log"
        log.write_text("")
        proc = record.launch("node-mounts", argv, log=log, node=self.node.name)
        self.st.processes.append(proc)
        self.node.mounts_pid = proc.pid
        self.st.checkpoint()
        _wait(proc, lambda: "ready" in log.read_text(), "the node's mount namespace", log)
        return proc

    def start_containerd(self) -> record.Process:
        log = self.dir / "containerd.log"
        argv = self.enter(tools.path("containerd"), "--config", str(self.containerd_config()),
                          "--log-level", "warn")  # fmt: skip
        proc = record.launch("containerd", argv, log=log, node=self.node.name)
        self.st.processes.append(proc)
        self.st.checkpoint()
        sock = pathlib.Path(f"/proc/{self.node.mounts_pid}/root/run/containerd/containerd.sock")
        _wait(proc, lambda: sock.exists() and self.ctr("version").returncode == 0,
              "containerd", log)  # fmt: skip
        return proc

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.enter(tools.path("ctr"), "-n", "k8s.io", *args),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def import_image(self, archive: pathlib.Path) -> None:
        done = self.ctr("images", "import", str(archive))
        if done.returncode != 0:
            raise NodeError(f"{self.node.name}: ctr images import {archive} failed: {done.stderr}")

    def discard_layers(self) -> None:
        """Deletes the imported layers' blobs, once unpacked: containers start from the unpacked
        snapshots, and each node's images then take half the memory (326 instead of 634 MiB
        for the podwire image). The manifests and configs stay: the kubelet sees the images."""
        listed = self.ctr("content", "ls")
        layers = [
            line.split()[0]
            for line in listed.stdout.splitlines()[1:]
            if "containerd.io/uncompressed=" in line
        ]
        if layers:
            done = self.ctr("content", "rm", *layers)
            if done.returncode != 0:
                raise NodeError(f"{self.node.name}: ctr content rm failed: {done.stderr.strip()}")

    def route_apiserver(self) -> None:
        """10.96.0.1:443 (the in-cluster address, which no kube-proxy serves here) to the node's
        relay on 127.0.0.1: from the node's own network (OUTPUT) and from its pods (PREROUTING,
        which may send to loopback only with route_localnet, in the node's namespace alone)."""
        ns = self.node.ns
        ns.ip("route", "replace", f"{certs.KUBERNETES_SERVICE_IP}/32", "dev", "lo")
        ns.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        for chain in ("OUTPUT", "PREROUTING"):
            ns.run(
                tools.path("iptables"), "-w", "-t", "nat", "-A", chain,
                "-d", f"{certs.KUBERNETES_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
                "-j", "DNAT", "--to-destination", f"127.0.0.1:{self.cp.apiserver_port}",
            )  # fmt: skip

    def start_kubelet(self) -> record.Process:
        log = self.dir / "kubelet.log"
        argv = self.enter(
            tools.path("kubelet"),
            f"--config={self.dir / 'kubelet.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
            f"--hostname-override={self.node.name}",
            f"--node-ip={self.node.underlay_ip}",
            "--node-labels=podwire.io/sandbox=true",
        )
        proc = record.launch("kubelet", argv, log=log, node=self.node.name)
        self.st.processes.append(proc)
        self.st.checkpoint()
        return proc


def _wait(proc: record.Process, ready: object, what: str, log: pathlib.Path) -> None:
    assert callable(ready)

    def started() -> bool:
        if ready():
            return True
        if not proc.alive():
            raise NodeError(f"{what} exited while starting: see {log}\n{_tail(log)}")
        return False

    try:
        supervisor.wait_until(started, timeout=START_TIMEOUT, interval=0.1, what=what)
    except TimeoutError:
        raise NodeError(f"{what} was not up after {START_TIMEOUT:.0f}s: see {log}") from None


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def node_ready(cp: controlplane.ControlPlane, names: list[str]) -> int:
    """How many of the named Nodes report Ready with their pod CIDR."""
    out = cp.kubectl("get", "nodes", "-o", "json", check=False)
    if out.returncode != 0:
        return 0
    count = 0
    for item in json.loads(out.stdout)["items"]:
        if item["metadata"]["name"] not in names or not item["spec"].get("podCIDR"):
            continue
        conds = {c["type"]: c["status"] for c in item.get("status", {}).get("conditions", [])}
        count += conds.get("Ready") == "True"
    return count


# -- pods ----------------------------------------------------------------------------------------

POD_NAMESPACE = "default"


def pod_manifest(name: str, node: str, image: str) -> dict[str, object]:
    """A pod that only holds its network: pause, or the podwire image's python3 waiting for
    SIGTERM (as PID 1 it must answer it, or every stop waits out the grace period)."""
    container: dict[str, object] = {"name": "pod", "image": image, "imagePullPolicy": "Never"}
    if image != PAUSE_IMAGE:
        container["command"] = [
            "python3", "-c",
            "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "signal.pause()",
        ]  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": POD_NAMESPACE,
                     "labels": {"podwire.io/sandbox": "true", "podwire.io/sandbox-pod": "true"}},
        "spec": {"nodeName": node, "containers": [container], "terminationGracePeriodSeconds": 2,
                 "automountServiceAccountToken": False,
                 "tolerations": [{"operator": "Exists"}]},
    }  # fmt: skip


def pod_pid(st: record.Record, node: record.Node, uid: str) -> int | None:
    """A process of the pod with this uid (its cgroup is pod<uid> under the node's root)."""
    root = f"/podwire-sandbox-{st.tag}/{node.name}"
    for controller in ("pids", "memory", "cpu"):
        top = CGROUP_BASE / controller / root.lstrip("/")
        for procs in sorted(top.glob(f"kubepods*/**/pod{uid}/*/cgroup.procs")):
            with contextlib.suppress(OSError, ValueError):
                pids = procs.read_text().split()
                if pids:
                    return int(pids[0])
    return None


def container_logs(node: record.Node) -> list[pathlib.Path]:
    """The logs of every container the node's kubelet ran (its /var/log/pods)."""
    return sorted((node.workdir / "root" / "var-log" / "pods").glob("*/*/*.log"))


def crashed_containers(node: record.Node, restarts: int = 2) -> list[tuple[str, pathlib.Path]]:
    """(namespace_pod/container, log) of containers that have run more than `restarts` times
    (the kubelet writes 0.log, 1.log, ... per run): a crash loop, for `up` to report."""
    out = []
    for log in container_logs(node):
        if log.stem.isdigit() and int(log.stem) == restarts:
            # The run before the current one has ended: its log says why.
            out.append(
                (f"{log.parent.parent.name}/{log.parent.name}", log.with_stem(str(restarts - 1)))
            )
    return out


def pods_waiting(cp: controlplane.ControlPlane) -> str:
    """Why the sandbox's pods are not running yet, as their statuses say."""
    out = cp.kubectl("get", "pods", "-A", "-o", "json", check=False)
    if out.returncode != 0:
        return out.stderr.strip()
    reasons = []
    for item in json.loads(out.stdout)["items"]:
        status = item.get("status", {})
        if status.get("phase") == "Running":
            continue
        why = [
            f"{c.get('reason')}: {c.get('message')}"
            for c in status.get("conditions", [])
            if c.get("status") != "True" and c.get("message")
        ]
        for cs in status.get("containerStatuses", []):
            for state in cs.get("state", {}).values():
                if state.get("reason"):
                    why.append(f"{state.get('reason')}: {state.get('message', '')}")
        name = f"{item['metadata']['namespace']}/{item['metadata']['name']}"
        reasons.append(f"{name} {status.get('phase')} ({'; '.join(why) or 'no reason given'})")
    return "; ".join(reasons) or "every pod runs"


def sandbox_pids(st: record.Record) -> set[int]:
    """Every live process of the sandbox: those recorded, those in its nodes' namespaces (the
    agents' engines, containerd's shims, pods on the node's network) and in its cgroups (pods)."""
    found = {p.pid for p in st.processes if p.alive()}
    for n in st.nodes:
        proc = subprocess.run(["ip", "netns", "pids", n.netns], capture_output=True, text=True)
        found.update(int(p) for p in proc.stdout.split() if p.isdigit())
    for root in st.cgroups:
        found.update(cgroup_pids(root))
    return found


def memory(st: record.Record) -> dict[str, int]:
    """The sandbox's memory in MiB: the sum of its processes' resident sets, and what its
    nodes' containerd keep in memory (images and their unpacked layers, on tmpfs)."""
    rss_kib = 0
    for pid in sandbox_pids(st):
        with contextlib.suppress(OSError):
            for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
    tmpfs = 0
    for n in st.nodes:
        if n.mounts_pid:
            with contextlib.suppress(OSError):
                fs = os.statvfs(f"/proc/{n.mounts_pid}/root/var/lib/containerd")
                tmpfs += (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    return {"processes_rss_mib": rss_kib // 1024, "containerd_tmpfs_mib": tmpfs // 2**20}
