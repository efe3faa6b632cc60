"""The one record of what a sandbox (or a test's cluster) made, kept as it is made.

The namespaces by name, the nodes and pods with their addresses, the processes by PID with the
start time the kernel gives that PID (so that a PID reused after a reboot or a crash is never
mistaken for ours), the command line and environment that started each (so that one can be
started again exactly as it was), and the files made outside the sandbox's directory.
sandbox.netns and sandbox.topology write into it while they build; `podwire sandbox up`
saves it as state.json in the sandbox directory at every step, so that `status`, `verify` and
`down`, from any later process, read the same record and `down` removes exactly that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import supervisor

STATE_FILE = "state.json"
_save_lock = threading.Lock()


@dataclasses.dataclass
class Process:
    """One process that was started, by PID and the kernel's start time of that PID."""

    role: str  # etcd, kube-apiserver, apiproxy, agent, engine; kubelet runtime: node-mounts,
    # containerd, kubelet, kube-controller-manager, kube-scheduler
    pid: int
    start_time: int
    argv: list[str]
    log: str
    node: str = ""  # the node it serves, for per-node processes
    netns: str = ""  # the namespace it runs in; empty: the host's
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # set on top of the caller's
    cwd: str = ""

    def alive(self) -> bool:
        return supervisor.alive(self)


def launch(
    role: str,
    argv: Sequence[str],
    *,
    log: pathlib.Path,
    node: str = "",
    netns: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str = "",
) -> Process:
    """Starts argv detached, through the supervisor, and returns its record."""
    proc = supervisor.start(argv, log=log, netns=netns, env=env, cwd=cwd or None)
    started = supervisor.start_time(proc.pid)
    if started is None:
        proc.wait()
        raise OSError(f"{role} exited at once ({proc.returncode}): see {log}")
    return Process(role, proc.pid, started, list(argv), str(log), node, netns, dict(env or {}), cwd)


def relaunch(proc: Process) -> Process:
    """The same process again: its command line, namespace, environment and log."""
    return launch(
        proc.role, proc.argv, log=pathlib.Path(proc.log), node=proc.node, netns=proc.netns,
        env=proc.env, cwd=proc.cwd,
    )  # fmt: skip


@dataclasses.dataclass
class Pod:
    name: str
    netns: str
    ip: str
    node: str

    @property
    def ns(self) -> netns_mod.Netns:
        return netns_mod.Netns(self.netns)


@dataclasses.dataclass
class Node:
    name: str
    index: int
    netns: str
    underlay_ip: str
    pod_cidr: str
    device: str
    workdir: pathlib.Path
    pods: list[Pod] = dataclasses.field(default_factory=list)
    # The kubelet runtime's: the process holding the node's own mount namespace (private /run,
    # /var/lib, /var/log), which its containerd and kubelet share; 0 in the process runtime.
    mounts_pid: int = 0

    @property
    def ns(self) -> netns_mod.Netns:
        return netns_mod.Netns(self.netns)

    @property
    def api_socket(self) -> pathlib.Path:
        if self.mounts_pid:  # the chart's agent: /var/run/podwire in the node's own /run, by
            # the short way (a socket's path has at most 107 characters)
            return pathlib.Path(f"/proc/{self.mounts_pid}/root/run/podwire/agent.sock")
        return self.workdir / "agent.sock"

    @property
    def key_path(self) -> pathlib.Path:
        return self.workdir / "private.key"


@dataclasses.dataclass
class Record:
    prefix: str = "pwt"  # every name given starts with prefix + a kind + tag
    tag: str = dataclasses.field(default_factory=lambda: secrets.token_hex(3))
    counter: int = 0  # names given so far, so that names given later stay unique
    underlay_netns: str = ""
    bridge: str = ""
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[Process] = dataclasses.field(default_factory=list)
    nodes: list[Node] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)  # made outside the directory
    # A saved sandbox's own: where it is saved, its datapath and its apiserver.
    directory: str = ""
    datapath: str = ""
    kubeconfig: str = ""
    apiserver_url: str = ""
    apiserver_port: int = 0

    # The kubelet runtime's: what the kubelets change on the machine, to be given back by down.
    runtime: str = "process"  # process | kubelet
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)  # the values before
    cgroups: list[str] = dataclasses.field(default_factory=list)  # the kubelets' cgroup roots

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in the sandbox")

    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def find(self, role: str, node: str = "") -> list[Process]:
        return [p for p in self.processes if p.role == role and p.node == node]

    def replace(self, old: Process, new: Process) -> None:
        self.processes = [new if p is old else p for p in self.processes]

    def checkpoint(self) -> None:
        """Saves a sandbox's record as it grows; a test's record (no directory) lives in memory."""
        if self.directory:
            self.save()

    def save(self) -> None:
        """Written atomically: a reader sees the old record or the new, never half of one.
        One thread at a time (real nodes start in parallel, each saving as it goes)."""
        with _save_lock:
            self._save()

    def _save(self) -> None:
        path = pathlib.Path(self.directory) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: pathlib.Path) -> Record | None:
        try:
            raw: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        raw["processes"] = [Process(**p) for p in raw.get("processes", [])]
        raw["nodes"] = [_node(n) for n in raw.get("nodes", [])]
        return cls(**raw)


def _node(raw: dict[str, Any]) -> Node:
    pods = [Pod(**p) for p in raw.get("pods", [])]
    return Node(**{**raw, "workdir": pathlib.Path(raw["workdir"]), "pods": pods})
