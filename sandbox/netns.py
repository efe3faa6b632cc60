"""Network namespaces, veth links and processes inside them, made and always removed.

The tests and the sandbox build their networks here, never on the machine's own interfaces:
every address they use lives inside a namespace this module created. A NetnsFactory records
everything it makes (namespaces by name in its record, processes by PID) and removes all of it
on close(), even after a failure halfway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from podwire.sandbox import record as record_mod
from podwire.sandbox import supervisor

IP = "ip"
TEST_GRACE = 5.0  # a test's processes: SIGTERM, and SIGKILL after this many seconds


class NetnsError(RuntimeError):
    """A namespace, link or process could not be set up; the message says which and why."""


def _run(
    args: Sequence[str], *, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    """One network namespace. Commands given to run() and popen() execute inside it."""

    name: str

    def exec_args(self, args: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *args]

    def run(
        self, *args: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.exec_args(args), timeout=timeout, check=check)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([IP, "-n", self.name, *args], check=check)

    def ping(
        self, address: str, *, count: int = 1, timeout: float = 5, interval: float = 0.2
    ) -> bool:
        """True when `count` pings to address all get an answer within timeout seconds."""
        proc = self.run(
            "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(max(1, int(timeout))),
            "-w", str(max(1, int(timeout))), address,
            timeout=timeout + 5, check=False,
        )  # fmt: skip
        return proc.returncode == 0

    def link_exists(self, dev: str) -> bool:
        return self.ip("link", "show", "dev", dev, check=False).returncode == 0


class NetnsFactory:
    """Makes namespaces, veth pairs and processes, writes each into its record, and removes
    every one of them on close()."""

    def __init__(self, prefix: str = "pwt", *, record: record_mod.Record | None = None) -> None:
        """A new record, or (given one) a record a previous process made, to add to."""
        self.record = record if record is not None else record_mod.Record(prefix=prefix)
        # Children this process holds (a test's servers and captures, what it hands over to
        # be ended with the namespaces); the record's processes are ended too.
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def prefix(self) -> str:
        return self.record.prefix

    @property
    def tag(self) -> str:
        """Random, in every name this factory gives: what tells its names from another's."""
        return self.record.tag

    @property
    def count(self) -> int:
        """Names given so far."""
        return self.record.counter

    @property
    def namespaces(self) -> list[Netns]:
        return [Netns(n) for n in self.record.namespaces]

    def unique(self, kind: str) -> str:
        """A name no other run of the tests uses at the same time; at most 15 characters."""
        self.record.counter += 1
        name = f"{self.prefix}{kind}{self.tag}{self.record.counter}"
        if len(name) > 15:
            raise NetnsError(f"name {name!r} is longer than the kernel's 15 characters")
        return name

    def namespace(self, kind: str = "n") -> Netns:
        ns = Netns(self.unique(kind))
        _run([IP, "netns", "add", ns.name])
        self.record.namespaces.append(ns.name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def delete_namespace(self, ns: Netns) -> None:
        """Ends the processes left inside ns (ours: only we start any there) and deletes it."""
        for pid in pids(ns.name):
            supervisor.kill(pid)
        _run([IP, "netns", "del", ns.name])
        if ns.name in self.record.namespaces:
            self.record.namespaces.remove(ns.name)

    def veth(
        self,
        a: Netns,
        b: Netns,
        *,
        a_addr: str | None = None,
        b_addr: str | None = None,
        a_name: str | None = None,
        b_name: str | None = None,
        mtu: int | None = None,
    ) -> tuple[str, str]:
        """A veth pair with one end in a and the other in b, both up; returns the two names."""
        a_name = a_name or self.unique("v")
        b_name = b_name or self.unique("v")
        _run(
            [IP, "link", "add", a_name, "netns", a.name, "type", "veth",
             "peer", "name", b_name, "netns", b.name]
        )  # fmt: skip
        for ns, dev, addr in ((a, a_name, a_addr), (b, b_name, b_addr)):
            if mtu:
                ns.ip("link", "set", dev, "mtu", str(mtu))
            if addr:
                ns.ip("addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
            ns.ip("link", "set", dev, "up")
        return a_name, b_name

    def bridge(self, ns: Netns, *, name: str = "br0", addr: str | None = None) -> str:
        ns.ip("link", "add", name, "type", "bridge")
        if addr:
            ns.ip("addr", "add", addr, "dev", name)
        ns.ip("link", "set", name, "up")
        return name

    def spawn(
        self,
        ns: Netns | None,
        args: Sequence[str],
        *,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Starts a process (inside ns, when given) that close() ends by its PID."""
        proc = supervisor.start(args, log=log_path, netns=ns.name if ns else "", env=env)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            supervisor.stop(proc, grace=TEST_GRACE)
        self.processes.clear()
        for recorded in reversed(self.record.processes):
            supervisor.stop(recorded, grace=TEST_GRACE)
        self.record.processes.clear()
        errors: list[str] = []
        for name in reversed(self.record.namespaces):
            # A process that the namespace still holds would keep its links alive: the
            # namespace's own PIDs are ended first, then the namespace is deleted.
            for pid in pids(name):
                supervisor.kill(pid)
            deleted = _run([IP, "netns", "del", name], check=False)
            if deleted.returncode != 0:
                errors.append(f"{name}: {deleted.stderr.strip()}")
        self.record.namespaces.clear()
        if errors:
            raise NetnsError("could not remove namespaces: " + "; ".join(errors))

    def __enter__(self) -> NetnsFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The names the tests have always used; the one implementation is the supervisor's.
stop_process = supervisor.stop
wait_until = supervisor.wait_until


def pids(name: str) -> list[int]:
    """The PIDs of the processes inside the named namespace."""
    proc = _run([IP, "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def unix_socket_answers(path: str | os.PathLike[str]) -> bool:
    """True when something accepts connections on the unix socket (not a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def factory(prefix: str = "pwt") -> Iterator[NetnsFactory]:
    f = NetnsFactory(prefix=prefix)
    try:
        yield f
    finally:
        f.close()
