"""The e2e tier: each test brings up its own sandbox with `podwire sandbox up`, in a temporary
directory, and removes it with `podwire sandbox down` afterwards, pass or fail; the teardown
then checks that nothing the sandbox recorded (namespace, process, file) is left."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from podwire.sandbox import cluster, record, supervisor, tools

PODWIRE = str(pathlib.Path(sys.executable).parent / "podwire")


def podwire(
    directory: pathlib.Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The podwire command line, as a user runs it, on the sandbox in directory."""
    env = {**os.environ, "PODWIRE_SANDBOX_DIR": str(directory)}
    return subprocess.run(
        [PODWIRE, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@dataclasses.dataclass
class Sandbox:
    """A running sandbox: its directory, how long `up` took, what `up` printed."""

    directory: pathlib.Path
    up_seconds: float
    up_output: str

    @property
    def api(self) -> cluster.Sandbox:
        return cluster.Sandbox(self.directory)

    @property
    def state(self) -> record.Record:
        return self.api.load()

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.api.cluster().cp.kubectl(*args)

    def wgnodes(self) -> dict[str, dict]:
        out = self.kubectl("get", "wgnodes", "-o", "json").stdout
        return {i["metadata"]["name"]: i for i in json.loads(out)["items"]}

    def pod(self, node: str, k: int = 0) -> record.Pod:
        return self.state.node(node).pods[k]

    def peers(self, node: str) -> dict[str, dict]:
        """`wg show DEV dump` of node's device, by peer public key."""
        n = self.state.node(node)
        out = n.ns.run(tools.path("wg"), "show", n.device, "dump").stdout
        peers = {}
        for line in out.strip().splitlines()[1:]:
            f = line.split("\t")
            peers[f[0]] = {
                "endpoint": f[2],
                "allowed_ips": f[3],
                "latest_handshake": int(f[4]),
                "rx": int(f[5]),
                "tx": int(f[6]),
            }
        return peers

    def agent_log(self, node: str) -> str:
        return pathlib.Path(self.state.node(node).workdir, "agent.log").read_text()


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: the sandbox makes network namespaces")


def recorded(directory: pathlib.Path) -> tuple[list[str], list[record.Process], list[str]]:
    st = record.Record.load(directory)
    if st is None:
        return [], [], []
    engines = [e for n in st.nodes if (e := cluster.find_engine(n)) is not None]
    return list(st.namespaces), [*st.processes, *engines], list(st.files)


def assert_nothing_left(
    directory: pathlib.Path, made: tuple[list[str], list[record.Process], list[str]]
) -> None:
    namespaces, processes, files = made
    assert not directory.exists(), f"{directory} is still there"
    left = [n for n in namespaces if pathlib.Path("/var/run/netns", n).exists()]
    assert not left, f"namespaces left behind: {left}"
    alive = [f"{p.role} {p.node} {p.pid}" for p in processes if p.alive()]
    assert not alive, f"processes left behind: {alive}"
    stale = [f for f in files if pathlib.Path(f).exists()]
    assert not stale, f"files left behind: {stale}"
    assert not _processes_referring_to(directory), "a process still uses the sandbox directory"


def _processes_referring_to(directory: pathlib.Path) -> list[int]:
    """PIDs whose command line or environment names directory (etcd, apiserver, agents)."""
    needle = str(directory).encode()
    pids = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            named = needle in (d / "cmdline").read_bytes() or needle in (d / "environ").read_bytes()
        except OSError:
            continue
        if named and supervisor.start_time(int(d.name)) is not None:  # zombies hold nothing
            pids.append(int(d.name))
    return pids


@pytest.fixture
def sandbox(tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A running 3-node sandbox of its own (`up`), removed afterwards (`down`), pass or fail."""
    _require_root()
    directory = tmp_path / "sandbox"
    nodes = getattr(request, "param", 3)
    started = time.monotonic()
    up = podwire(directory, "sandbox", "up", "--runtime", "process", "--nodes", str(nodes))
    took = time.monotonic() - started
    made = recorded(directory)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Sandbox(directory, took, up.stdout)
    finally:
        made = _merge(made, recorded(directory))
        down = podwire(directory, "sandbox", "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert_nothing_left(directory, made)


def _merge(
    a: tuple[list[str], list[record.Process], list[str]],
    b: tuple[list[str], list[record.Process], list[str]],
) -> tuple[list[str], list[record.Process], list[str]]:
    pids = {p.pid for p in b[1]}
    return (
        list(dict.fromkeys([*a[0], *b[0]])),
        [*b[1], *(p for p in a[1] if p.pid not in pids)],
        list(dict.fromkeys([*a[2], *b[2]])),
    )


class PingStream:
    """`ping` from one pod to another at a fixed rate, counted at the end."""

    def __init__(
        self, src: record.Pod, dst: record.Pod, *, count: int, interval: float = 0.01
    ) -> None:
        self.src, self.dst, self.count = src, dst, count
        args = ["ping", "-n", "-q", "-i", str(interval), "-c", str(count), "-W", "1", dst.ip]
        self.proc = subprocess.Popen(src.ns.exec_args(args), stdout=subprocess.PIPE, text=True)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout: float = 120) -> tuple[int, int, str]:
        """(transmitted, received, ping's summary)."""
        out, _ = self.proc.communicate(timeout=timeout)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2)), out.strip().splitlines()[-2]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """podwire(directory, *args): the command line on the sandbox in directory."""
    return podwire


@pytest.fixture
def nothing_left() -> Callable[[pathlib.Path], None]:
    """Asserts that the sandbox once in directory left no namespace, process or file."""
    return lambda directory: assert_nothing_left(directory, recorded(directory))


@pytest.fixture
def ping_stream() -> Iterator[Callable[..., PingStream]]:
    """Starts ping streams between pods; any still running at the end is ended."""
    streams: list[PingStream] = []

    def start(src: record.Pod, dst: record.Pod, **kwargs: Any) -> PingStream:
        streams.append(PingStream(src, dst, **kwargs))
        return streams[-1]

    yield start
    for s in streams:
        s.stop()


@dataclasses.dataclass
class RealNodes:
    """A running sandbox of real nodes (`up --runtime kubelet`), and what the machine was like
    before it: the sysctls a kubelet changes, which of the paths it could make existed."""

    directory: pathlib.Path
    up_seconds: float
    up_output: str
    before_sysctls: dict[str, str]
    before_paths: set[str]

    @property
    def api(self) -> cluster.Sandbox:
        return cluster.Sandbox(self.directory)

    @property
    def state(self) -> record.Record:
        return self.api.load()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return podwire(self.directory, *args)

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.api.cluster().cp.kubectl(*args, "-o", "json").stdout)

    def made(self) -> tuple[list[str], list[record.Process], list[str]]:
        return recorded(self.directory)

    def assert_nothing_left(self, made: tuple[list[str], list[record.Process], list[str]]) -> None:
        assert_nothing_left(self.directory, made)


KUBELET_NODES = 3


@pytest.fixture
def kubelet_sandbox(tmp_path: pathlib.Path) -> Iterator[RealNodes]:
    """`podwire sandbox up --runtime kubelet` (3 nodes) of its own, removed afterwards (`down`,
    unless the test did), pass or fail. Nothing is skipped: without root, the built node
    components, the Debian packages or the podwire image, it fails and says which."""
    from podwire.sandbox import kubenode

    assert os.geteuid() == 0, "the kubelet runtime needs root (namespaces, mounts, cgroups)"
    kubenode.check_prerequisites()
    ref, _ = kubenode.pod_image()
    assert ref != kubenode.PAUSE_IMAGE, "no podwire image: run hack/image.sh"
    directory = tmp_path / "sandbox"
    before_sysctls = {
        k: pathlib.Path("/proc/sys", *k.split(".")).read_text().strip()
        for k in kubenode.KUBELET_SYSCTLS
    }
    before_paths = {p for p in kubenode.HOST_PATHS if os.path.lexists(p)}
    started = time.monotonic()
    up = podwire(
        directory, "sandbox", "up", "--runtime", "kubelet", "--nodes", str(KUBELET_NODES),
        timeout=600,
    )  # fmt: skip
    took = time.monotonic() - started
    made = recorded(directory)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield RealNodes(directory, took, up.stdout, before_sysctls, before_paths)
    finally:
        made = _merge(made, recorded(directory))
        if directory.exists():
            down = podwire(directory, "sandbox", "down")
            assert down.returncode == 0, down.stdout + down.stderr
        assert_nothing_left(directory, made)
