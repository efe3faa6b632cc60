"""What a sandbox made, written down so that a later process can find and remove exactly that.

`podwire sandbox up` exits while the sandbox keeps running: its namespaces are persisted by
name (`ip netns add`), its processes run detached in their own sessions. This file, state.json
in the sandbox directory, records each of them: the namespaces by name, the processes by PID
with the start time the kernel gives that PID (so a PID reused after a reboot or a crash is
never mistaken for ours), the command line and environment that started each (so one can be
restarted exactly as it was), and the nodes and pods with their addresses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

STATE_FILE = "state.json"


@dataclasses.dataclass
class Process:
    """One process the sandbox started, by PID and the kernel's start time of that PID."""

    role: str  # etcd, kube-apiserver, apiproxy, agent, engine
    pid: int
    start_time: int
    argv: list[str]
    log: str
    node: str = ""  # the node it serves, for per-node processes
    netns: str = ""  # the namespace it runs in; empty: the host's
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # set on top of ours
    cwd: str = ""

    def alive(self) -> bool:
        return start_time(self.pid) == self.start_time


@dataclasses.dataclass
class Pod:
    name: str
    netns: str
    ip: str
    node: str


@dataclasses.dataclass
class Node:
    name: str
    index: int
    netns: str
    underlay_ip: str
    pod_cidr: str
    device: str
    workdir: str
    pods: list[Pod] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class State:
    directory: str
    datapath: str
    kubeconfig: str
    apiserver_url: str
    apiserver_port: int
    prefix: str  # every name the sandbox gives starts with prefix + tag
    tag: str
    counter: int  # names made so far, so that names made later stay unique
    underlay_netns: str
    bridge: str
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[Process] = dataclasses.field(default_factory=list)
    nodes: list[Node] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)  # made outside the directory

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in the sandbox")

    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def find(self, role: str, node: str = "") -> list[Process]:
        return [p for p in self.processes if p.role == role and p.node == node]

    def save(self) -> None:
        """Written atomically: a reader sees the old state or the new, never half of one."""
        path = pathlib.Path(self.directory) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: pathlib.Path) -> State | None:
        try:
            raw: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        raw["processes"] = [Process(**p) for p in raw.get("processes", [])]
        raw["nodes"] = [
            Node(**{**n, "pods": [Pod(**p) for p in n.get("pods", [])]})
            for n in raw.get("nodes", [])
        ]
        return cls(**raw)


def start_time(pid: int) -> int | None:
    """The PID's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if
    there is no such process or only its zombie is left."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, field 2, may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def spawn(
    role: str,
    argv: Sequence[str],
    *,
    log: pathlib.Path,
    node: str = "",
    netns: str = "",
    env: dict[str, str] | None = None,
    cwd: str = "",
) -> Process:
    """Starts argv detached (its own session, no terminal), inside netns when given."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd or None,
        )  # fmt: skip
    # `ip netns exec` execs the command in place, so the PID is the command's own.
    started = start_time(proc.pid)
    if started is None:
        proc.wait()
        raise OSError(f"{role} exited at once ({proc.returncode}): see {log}")
    return Process(role, proc.pid, started, list(argv), str(log), node, netns, env or {}, cwd)


def respawn(proc: Process) -> Process:
    """The same process again: its command line, namespace, environment and log."""
    return spawn(
        proc.role,
        proc.argv,
        log=pathlib.Path(proc.log),
        node=proc.node,
        netns=proc.netns,
        env=proc.env,
        cwd=proc.cwd,
    )


def stop(proc: Process, *, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """sig (SIGTERM), then SIGKILL after grace seconds; only if the PID is still ours."""
    if not proc.alive():
        _reap(proc.pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not proc.alive():
            return
        time.sleep(0.05)
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc.alive() and time.monotonic() < deadline:
        _reap(proc.pid)
        time.sleep(0.05)


def _reap(pid: int) -> None:
    """Collects the exit of a child of this process, so that it leaves no zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
