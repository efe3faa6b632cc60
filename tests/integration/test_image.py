"""podwire's image (the Dockerfile, built by hack/image.sh): it lints, it is current, each of
its three programs starts in it and, as the container's PID 1, ends at once on SIGTERM; and
podwire-engine from the image carries pings through a tunnel to wireguard-go.

ns a (podman --network ns:a)                 ns b (on the host)
podwire-engine in the image                  wireguard-go
DEV 10.99.0.1/24 ======= tunnel =======      DEV 10.99.0.2/24
veth 192.0.2.1/24 ------- underlay -------   veth 192.0.2.2/24

The engine's UAPI socket folder is a temporary folder bind-mounted into the container; `wg` on
the host reaches it in a private mount namespace where that folder is /run/wireguard. The
agent and the operator reach the session's apiserver from a node namespace through the
sandbox's relay (sandbox.apiproxy). Every container is removed with `podman rm -f`, before the
namespaces go, whether the test passed or not.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator

import pytest

from podwire.sandbox import controlplane, supervisor, tools, topology
from podwire.sandbox import netns as netns_mod

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE_SH = ROOT / "hack" / "image.sh"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
PORT = 51820
# A program that handles SIGTERM exits well within this (0.1-1.7 s measured, the operator's
# the longest: it gives its Lease up); one that ignores it as PID 1 would be killed only after
# STOP_TIMEOUT, with exit code 137.
PROMPT_EXIT = 3.0
STOP_TIMEOUT = 30
CAP_NET_ADMIN = 12


def _run(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{shlex.join(args)}` failed ({proc.returncode}): {proc.stderr}")
    return proc


def _podman_env() -> dict[str, str]:
    """This process's environment plus the podman settings hack/image.sh builds with."""
    line = _run([str(IMAGE_SH), "env"]).stdout.strip()
    pairs = [word.split("=", 1) for word in shlex.split(line.removeprefix("export "))]
    return {**os.environ, **dict(pairs)}


class Podman:
    """podman with hack/image.sh's settings; every container it runs goes at close()."""

    def __init__(self, prefix: str) -> None:
        self.env = _podman_env()
        self.prefix = prefix
        self.names: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return _run(["podman", *args], env=self.env, check=check, timeout=timeout).stdout

    def run(self, role: str, image: str, *args: str, options: list[str]) -> str:
        name = f"{self.prefix}-{role}"
        self.names.append(name)
        # As the chart runs it: a read-only root (what a program writes goes to the folders it
        # is given), no capability but those added, no privilege gained by exec.
        confined = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        self("run", "-d", "--name", name, *confined, *options, image, *args)
        return name

    def logs(self, name: str) -> str:
        proc = _run(["podman", "logs", name], env=self.env, check=False)
        return proc.stdout + proc.stderr

    def state(self, name: str) -> dict[str, object]:
        state: dict[str, object] = json.loads(self("inspect", "--format", "json", name))[0]["State"]
        return state

    def stop(self, name: str) -> float:
        """Sends SIGTERM by `podman stop`; returns seconds from the signal to the exit."""
        sent = datetime.datetime.now(datetime.UTC)
        self("stop", "-t", str(STOP_TIMEOUT), name, timeout=STOP_TIMEOUT + 30)
        finished = datetime.datetime.fromisoformat(str(self.state(name)["FinishedAt"]))
        return (finished - sent).total_seconds()

    def close(self) -> None:
        for name in reversed(self.names):
            _run(["podman", "rm", "-f", "-t", "0", name], env=self.env, check=False)
        self.names.clear()


@pytest.fixture(scope="module")
def image() -> str:
    """The image of the sources as they are: hack/image.sh builds it only when they changed
    (setup has built it on a machine that ran `make setup`)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: podman, network namespaces and TUN")
    proc = _run([str(IMAGE_SH)], timeout=900)
    current = _current()
    assert current["REF"].startswith("localhost/podwire:"), proc.stderr
    return current["REF"]


@pytest.fixture
def podman(netns: netns_mod.NetnsFactory) -> Iterator[Podman]:
    # After netns in the fixture order, so the containers go before their namespaces.
    p = Podman(f"pwimg{netns.tag}")
    try:
        yield p
    finally:
        p.close()


def _current() -> dict[str, str]:
    text = (ROOT / ".cache" / "image" / "current").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# -- the Dockerfile and the build ----------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile(tmp_path: pathlib.Path) -> None:
    proc = _run([str(HADOLINT), str(ROOT / "Dockerfile")], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The control: the same linter on the Dockerfile with a classic mistake added fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text((ROOT / "Dockerfile").read_text() + "RUN cd /tmp && apt-get install curl\n")
    proc = _run([str(HADOLINT), str(bad)], check=False)
    assert proc.returncode != 0 and "DL3003" in proc.stdout, proc.stdout


def test_the_build_context_is_what_the_hash_covers() -> None:
    # .dockerignore lets in only what hack/image.sh hashes: a source the image is made of
    # but the hash missed would leave a stale image looking current.
    allowed = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    hashed = set(_run([str(IMAGE_SH), "inputs"]).stdout.split())
    assert hashed - {"Dockerfile", ".dockerignore"} == allowed


def test_the_hash_follows_the_sources_and_nothing_else(tmp_path: pathlib.Path) -> None:
    inputs = _run([str(IMAGE_SH), "inputs"]).stdout.split()
    copy = tmp_path / "src"
    (copy / "hack").mkdir(parents=True)
    shutil.copy2(IMAGE_SH, copy / "hack" / "image.sh")
    for name in inputs:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / name)
    (copy / "tests").mkdir()

    def digest() -> str:
        return _run([str(copy / "hack" / "image.sh"), "hash", "base-id"]).stdout.strip()

    first = digest()
    assert first == digest()
    (copy / "tests" / "test_new.py").write_text("x = 1\n")  # not in the image
    (copy / "agent" / "__pycache__").mkdir(exist_ok=True)
    (copy / "agent" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    assert digest() == first
    main = copy / "agent" / "main.py"
    main.write_text(main.read_text() + "\n# changed\n")
    changed = digest()
    assert changed != first
    main.chmod(0o755)  # the mode goes into the image too
    assert digest() != changed
    assert _run([str(copy / "hack" / "image.sh"), "hash", "another-base"]).stdout.strip() not in (
        first,
        changed,
    )


def test_the_image_is_current_and_saved_for_containerd(image: str) -> None:
    env = _podman_env()
    current = _current()
    assert current["HASH"] == _run([str(IMAGE_SH), "hash"]).stdout.strip()
    assert image == f"localhost/podwire:{current['HASH']}"
    ids = {
        ref: _run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], env=env).stdout
        for ref in (image, "localhost/podwire:dev")
    }
    assert len(set(ids.values())) == 1, ids
    # The archive is what `ctr images import` reads: a docker-archive naming the tag.
    with tarfile.open(current["ARCHIVE"]) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert [image] == [tag for m in manifest for tag in m["RepoTags"] if tag == image], manifest
    # Nothing changed since: the next run only checks, and says so.
    started = time.monotonic()
    proc = _run([str(IMAGE_SH)])
    assert "is current" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 10


def test_the_image_holds_the_tools_and_no_build_tools(image: str, podman: Podman) -> None:
    script = (
        "for t in podwire-agent podwire-operator podwire-engine podwire ip wg; do command -v $t; done;"
        " for t in pip pip3 gcc cc apt-utils; do command -v $t && echo HAS $t; done;"
        " python3 -c 'import pip' 2>/dev/null && echo HAS pip-module; echo done"
    )
    out = podman("run", "--rm", "--network", "none", image, "sh", "-c", script)
    assert "HAS" not in out, out
    for tool in ("podwire-agent", "podwire-operator", "podwire-engine", "/ip", "/wg"):
        assert tool in out, out
    config = json.loads(podman("image", "inspect", "--format", "json", image))[0]["Config"]
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"] and config["Cmd"] == ["podwire-agent"]


# -- each program, under tini or as PID 1 -----------------------------------------------------


def _wait_for_log(podman: Podman, name: str, needle: str, *, timeout: float = 60) -> None:
    def seen() -> bool:
        if podman.state(name)["Status"] != "running":
            raise AssertionError(f"{name} exited: {podman.logs(name)[-3000:]}")
        return needle in podman.logs(name)

    supervisor.wait_until(seen, timeout=timeout, what=f"{needle} in {name}'s log")


def _assert_stops_at_once(podman: Podman, name: str, *, exit_codes: tuple[int, ...] = (0,)) -> str:
    """Stops the container with SIGTERM; returns its log."""
    seconds = podman.stop(name)
    print(f"{name}: {seconds:.2f} s from SIGTERM to exit")
    state = podman.state(name)
    logs = podman.logs(name)[-3000:]
    assert state["ExitCode"] in exit_codes, f"exit code {state['ExitCode']}: {logs}"
    assert seconds < PROMPT_EXIT, f"{seconds:.2f} s from SIGTERM to exit: {logs}"
    return logs


def _pid1(podman: Podman, name: str) -> str:
    return podman("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ").strip()


@pytest.mark.parametrize("pid1", ["tini", "engine"])
def test_the_engine_starts_and_ends_on_sigterm(
    image: str, podman: Podman, netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path, pid1: str
) -> None:
    # Under tini as a pod's `args:` runs it, and as PID 1 itself as a pod's `command:` does.
    ns = netns.namespace("e")
    uapi = tmp_path / "uapi"
    uapi.mkdir(mode=0o700)
    dev = netns.unique("w")
    options = _engine_options(ns, uapi)
    if pid1 == "tini":
        name = podman.run("engine", image, "podwire-engine", dev, options=options)
    else:
        options += ["--entrypoint", "podwire-engine"]
        name = podman.run("engine", image, dev, options=options)
    supervisor.wait_until(
        lambda: netns_mod.unix_socket_answers(uapi / f"{dev}.sock") and ns.link_exists(dev),
        timeout=30,
        what="podwire-engine in the image to serve",
    )
    first = _pid1(podman, name)
    assert first.startswith("/usr/bin/tini -- podwire-engine" if pid1 == "tini" else "/opt/"), first
    logs = _assert_stops_at_once(podman, name)
    assert '"reason": "SIGTERM"' in logs, logs
    assert not ns.link_exists(dev) and not (uapi / f"{dev}.sock").exists()


def test_a_program_stopped_while_it_starts_ends_at_once(
    image: str, podman: Podman, tmp_path: pathlib.Path
) -> None:
    # The operator installs its SIGTERM handler only once started, seconds after its start
    # when the apiserver does not answer (here: no network at all). Under tini a SIGTERM
    # before that still ends it at once (by the signal: 143), where as PID 1 it would be lost
    # and the stop would wait out its timeout.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    kubeconfig.chmod(0o644)  # no credential in it
    name = podman.run(
        "early", image, "podwire-operator", f"--kubeconfig={kubeconfig}", "--namespace=x",
        options=["--user", "65532:65532", "--network", "none",
                 "--volume", f"{kubeconfig}:{kubeconfig}:ro"],
    )  # fmt: skip
    _assert_stops_at_once(podman, name, exit_codes=(0, 143))


@pytest.fixture
def node(
    crds: controlplane.ControlPlane, netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> Iterator[tuple[topology.Cluster, topology.Node]]:
    """A node namespace with its Node object and its relay to the session's apiserver."""
    cluster = topology.Cluster(netns, crds, tmp_path / "cluster")
    name = f"image{netns.tag}"
    try:
        n = cluster.add_node(name, pods=0, pod_bridge=False)
        cluster.start_proxy(n)
        yield cluster, n
    finally:
        for kind in ("node", "wgnode"):
            crds.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false", check=False)


def test_the_agent_starts_and_ends_on_sigterm(
    image: str,
    podman: Podman,
    node: tuple[topology.Cluster, topology.Node],
    tmp_path: pathlib.Path,
) -> None:
    cluster, n = node
    uapi = tmp_path / "uapi"
    uapi.mkdir(mode=0o700)
    kubeconfig = cluster.cp.kubeconfig
    env = cluster.agent_env(n, datapath="userspace")
    options = [
        *_engine_options(n.ns, uapi),
        "--volume", f"{kubeconfig}:{kubeconfig}:ro",
        "--volume", f"{n.workdir}:{n.workdir}",
        *[f"--env={k}={v}" for k, v in env.items()],
    ]  # fmt: skip
    name = podman.run("agent", image, options=options)  # the image's default command
    _wait_for_log(podman, name, '"event": "started"')
    # It works, not only runs: its WireguardNode, with the key it made, is Ready.
    supervisor.wait_until(
        lambda: _wgnode_ready(cluster.cp, n.name), timeout=60, what="the agent's WireguardNode"
    )
    assert n.key_path.stat().st_mode & 0o777 == 0o600
    assert _effective_capabilities(podman, name) == 1 << CAP_NET_ADMIN
    assert '"signal": "SIGTERM"' in _assert_stops_at_once(podman, name)


def _effective_capabilities(podman: Podman, name: str) -> int:
    status = podman("exec", name, "cat", "/proc/1/status")
    return int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16)


def _wgnode_ready(cp: controlplane.ControlPlane, name: str) -> bool:
    proc = cp.kubectl("get", "wgnode", name, "-o", "json", check=False)
    if proc.returncode != 0:
        return False
    conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def test_the_operator_runs_as_65532_and_ends_on_sigterm(
    image: str,
    podman: Podman,
    node: tuple[topology.Cluster, topology.Node],
    tmp_path: pathlib.Path,
) -> None:
    cluster, n = node
    cp = cluster.cp
    namespace = f"image-{n.name}"
    cp.kubectl("create", "namespace", namespace)
    try:
        # The chart's user reads its credentials; they stay 0600, owned by that user.
        creds = tmp_path / "operator"
        creds.mkdir(mode=0o700)
        kubeconfig = creds / "kubeconfig"
        fd = os.open(kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cp.kubeconfig.read_text())
        for path in (creds, kubeconfig):
            os.chown(path, 65532, 65532)
        identity = f"operator-{n.name}"
        name = podman.run(
            "operator", image, "podwire-operator",
            f"--kubeconfig={kubeconfig}", f"--namespace={namespace}", f"--identity={identity}",
            "--metrics-address=127.0.0.1:9872",
            options=[
                "--user", "65532:65532", "--network", f"ns:/run/netns/{n.netns}",
                "--volume", f"{creds}:{creds}:ro",
            ],
        )  # fmt: skip
        assert podman("exec", name, "id", "-u").strip() == "65532"
        assert _effective_capabilities(podman, name) == 0
        supervisor.wait_until(
            lambda: _lease_holder(cp, namespace) == identity,
            timeout=60,
            what=f"the operator in the image to lead: {podman.logs(name)[-2000:]}",
        )
        assert '"signal": "SIGTERM"' in _assert_stops_at_once(podman, name)
        assert "lease_released" in podman.logs(name)
        assert _lease_holder(cp, namespace) != identity
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _lease_holder(cp: controlplane.ControlPlane, namespace: str) -> str:
    proc = cp.kubectl(
        "get", "lease", "-n", namespace, "podwire-operator",
        "-o", "jsonpath={.spec.holderIdentity}", check=False,
    )  # fmt: skip
    return proc.stdout.strip() if proc.returncode == 0 else ""


# -- the engine from the image, in a tunnel ----------------------------------------------------


def _engine_options(ns: netns_mod.Netns, uapi: pathlib.Path) -> list[str]:
    return [
        "--network", f"ns:/run/netns/{ns.name}",
        "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun",
        "--volume", f"{uapi}:/run/wireguard",
    ]  # fmt: skip


def _wg_through(uapi: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's `wg`, seeing uapi as its socket folder (in a mount namespace of its own)."""
    script = 'mount --bind "$0" /run/wireguard && exec wg "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(uapi)]
    return _run([*argv, *args], timeout=30)


def test_the_engine_in_the_image_tunnels_pings_to_wireguard_go(
    image: str, podman: Podman, netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    a, b = netns.namespace("a"), netns.namespace("b")
    netns.veth(a, b, a_addr="192.0.2.1/24", b_addr="192.0.2.2/24")
    uapi = tmp_path / "uapi"
    uapi.mkdir(mode=0o700)
    keys = {}
    for side in ("a", "b"):
        private, public = tools.wg_keypair()
        keyfile = tmp_path / f"{side}.key"
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private + "\n")
        keys[side] = (keyfile, public)
    dev_a, dev_b = netns.unique("w"), netns.unique("w")

    name = podman.run("tunnel", image, "podwire-engine", dev_a, options=_engine_options(a, uapi))
    netns.spawn(
        b,
        [tools.path("wireguard-go"), "-f", dev_b],
        log_path=tmp_path / "wireguard-go.log",
        env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
    )
    supervisor.wait_until(
        lambda: (
            netns_mod.unix_socket_answers(uapi / f"{dev_a}.sock")
            and netns_mod.unix_socket_answers(pathlib.Path("/run/wireguard") / f"{dev_b}.sock")
        ),
        timeout=30,
        what="both engines to serve",
    )
    _wg_through(
        uapi, "set", dev_a, "private-key", str(keys["a"][0]), "listen-port", str(PORT),
        "peer", keys["b"][1], "endpoint", f"192.0.2.2:{PORT}", "allowed-ips", "10.99.0.2/32",
    )  # fmt: skip
    b.run(
        "wg", "set", dev_b, "private-key", str(keys["b"][0]), "listen-port", str(PORT),
        "peer", keys["a"][1], "endpoint", f"192.0.2.1:{PORT}", "allowed-ips", "10.99.0.1/32",
    )  # fmt: skip
    for ns, dev, address in ((a, dev_a, "10.99.0.1/24"), (b, dev_b, "10.99.0.2/24")):
        ns.ip("addr", "add", address, "dev", dev)
        ns.ip("link", "set", dev, "up")

    assert a.ping("10.99.0.2", count=5, timeout=15), podman.logs(name)[-3000:]
    # The engine in the container made the session and carried the pings: its own counters.
    peer = _wg_through(uapi, "show", dev_a, "dump").stdout.splitlines()[1].split("\t")
    latest_handshake, rx, tx = int(peer[4]), int(peer[5]), int(peer[6])
    assert latest_handshake > 0 and rx > 0 and tx > 0, peer


def test_the_archive_imports_into_containerd(
    image: str, netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    # What a real node does with it: `ctr images import` into a containerd of the test's own
    # (its root, state and socket in tmp_path; no CRI), which unpacks it for runc.
    root = tmp_path / "containerd"
    root.mkdir()
    sock = root / "containerd.sock"
    (root / "config.toml").write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\n'
        f'state = "{root / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
        # Its opt plugin would otherwise make /opt/containerd on the machine itself.
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root / "opt"}"\n'
    )
    netns.spawn(None, ["containerd", "--config", str(root / "config.toml")], log_path=root / "log")
    try:
        supervisor.wait_until(
            lambda: netns_mod.unix_socket_answers(sock), timeout=30, what="containerd"
        )
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
        _run([*ctr, "images", "import", _current()["ARCHIVE"]], timeout=300)
        listed = _run([*ctr, "images", "ls", "-q"]).stdout.split()
        assert image in listed, listed
        mounts = _run([*ctr, "snapshots", "ls"]).stdout
        assert "Committed" in mounts, mounts  # unpacked, layer by layer
        assert (root / "opt").is_dir(), "containerd's opt folder is not the test's own"
    finally:
        for proc in netns.processes:
            supervisor.stop(proc)
        shutil.rmtree(root, ignore_errors=True)
