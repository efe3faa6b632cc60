"""Network namespaces, veth links and processes inside them, made and always removed.

The tests and the sandbox build their networks here, never on the machine's own interfaces:
every address they use lives inside a namespace this module created. A NetnsFactory records
everything it makes (namespaces, links, processes by PID) and removes all of it on close(),
even after a failure halfway.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

IP = "ip"


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


@dataclass
class NetnsFactory:
    """Makes namespaces, veth pairs and processes, and removes every one of them on close()."""

    prefix: str = "pwt"
    namespaces: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)
    _tag: str = field(default_factory=lambda: secrets.token_hex(3))
    _count: int = 0

    @property
    def tag(self) -> str:
        """Random, in every name this factory gives: what tells its names from another's."""
        return self._tag

    @property
    def count(self) -> int:
        """Names given so far; a factory rebuilt with it keeps giving new ones."""
        return self._count

    def unique(self, kind: str) -> str:
        """A name no other run of the tests uses at the same time; at most 15 characters."""
        self._count += 1
        name = f"{self.prefix}{kind}{self._tag}{self._count}"
        if len(name) > 15:
            raise NetnsError(f"name {name!r} is longer than the kernel's 15 characters")
        return name

    def namespace(self, kind: str = "n") -> Netns:
        ns = Netns(self.unique(kind))
        _run([IP, "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def delete_namespace(self, ns: Netns) -> None:
        """Ends the processes left inside ns (ours: only we start any there) and deletes it."""
        for pid in _pids_in(ns.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run([IP, "netns", "del", ns.name])
        if ns in self.namespaces:
            self.namespaces.remove(ns)

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
            [
                IP,
                "link",
                "add",
                a_name,
                "netns",
                a.name,
                "type",
                "veth",
                "peer",
                "name",
                b_name,
                "netns",
                b.name,
            ]
        )
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
        full = ns.exec_args(args) if ns else list(args)
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )  # fmt: skip
        finally:
            if log_path:
                out.close()  # type: ignore[union-attr]
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        errors: list[str] = []
        for proc in reversed(self.processes):
            stop_process(proc)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            # A process that the namespace still holds would keep its links alive: the
            # namespace's own PIDs are ended first, then the namespace is deleted.
            for pid in _pids_in(ns.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deleted = _run([IP, "netns", "del", ns.name], check=False)
            if deleted.returncode != 0:
                errors.append(f"{ns.name}: {deleted.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise NetnsError("could not remove namespaces: " + "; ".join(errors))

    def __enter__(self) -> NetnsFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace seconds; only this PID, which we started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(grace)


def _pids_in(name: str) -> list[int]:
    proc = _run([IP, "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def wait_until(
    predicate: object, *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Polls predicate() until it is true; raises TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


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
