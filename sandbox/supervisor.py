"""Starting and stopping the processes the sandbox and the tests run, and waiting on them.

A PID alone does not name a process: once it has exited and been reaped, the kernel may give
the same PID to another (after a reboot, or a crash of the `podwire` command that started it).
So a process is known here by its PID and the start time the kernel gives that PID (field 22
of /proc/PID/stat), and it is signalled only while both still match. Every process is stopped
the same way: SIGTERM, SIGKILL after a grace, and reaped if it is our child, so that no zombie
stays. Every wait for something asynchronous is `wait_until`: a deadline, never a bare sleep.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

GRACE = 10.0  # seconds between SIGTERM and SIGKILL
KILL_WAIT = 5.0  # seconds to wait for a SIGKILL to take
POLL = 0.05

# Children this process started and has not reaped: their Popen reaps them, keeping the status.
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


class Identified(Protocol):
    """A process by its PID and the kernel's start time of that PID."""

    @property
    def pid(self) -> int: ...

    @property
    def start_time(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Pid:
    pid: int
    start_time: int


def start_time(pid: int) -> int | None:
    """The PID's start time in clock ticks since boot; None if there is no such process or
    only its zombie is left."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, field 2, may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def identify(pid: int) -> Pid | None:
    """The process that holds pid now, or None."""
    started = start_time(pid)
    return None if started is None else Pid(pid, started)


def alive(proc: Identified) -> bool:
    """True while the PID still belongs to the process that was recorded."""
    return start_time(proc.pid) == proc.start_time


def cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def start(
    argv: Sequence[str],
    *,
    log: str | os.PathLike[str] | None = None,
    netns: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    session: bool = True,
    stdout_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Starts argv (inside the named network namespace, when given) with env set on top of
    ours, its output appended to log (else discarded, or a pipe). In its own session unless
    told otherwise, so that it outlives a terminal's Ctrl-C and the command that started it."""
    # `ip netns exec` execs the command in place, so the PID is the command's own.
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    out = open(log, "ab") if log is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else (out or subprocess.DEVNULL),
            stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=session, cwd=cwd,
        )  # fmt: skip
    finally:
        if out is not None:
            out.close()
    with _children_lock:
        _children[proc.pid] = proc
    return proc


def stop(proc: Identified | subprocess.Popen[bytes], *, grace: float = GRACE) -> None:
    """SIGTERM, then SIGKILL after grace seconds; returns once it is gone. Does nothing to a
    PID that is no longer the recorded process's."""
    target = _identified(proc)
    if target is None:
        return
    _signal(target, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: _gone(target), timeout=grace, interval=POLL, what="exit")
        return
    _signal(target, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: _gone(target), timeout=KILL_WAIT, interval=POLL, what="exit")


def stop_all(procs: Iterable[Identified], *, grace: float = GRACE) -> None:
    """Stops them all at once: a batch takes one grace, not one each."""
    batch = list(procs)
    if not batch:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(batch))) as pool:
        list(pool.map(lambda p: stop(p, grace=grace), batch))


def kill(pid: int) -> None:
    """SIGKILL, at once, to whatever holds pid now (a process left in a namespace we delete)."""
    target = identify(pid)
    if target is not None:
        _signal(target, signal.SIGKILL)


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = POLL,
    what: str = "condition",
) -> None:
    """Polls predicate() until it is true; raises TimeoutError naming `what` at the deadline.
    An exception from predicate ends the wait (how a wait notices that its process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _identified(proc: Identified | subprocess.Popen[bytes]) -> Identified | None:
    if isinstance(proc, subprocess.Popen):
        # Our own child cannot have given its PID away until it is reaped: poll() says.
        with _children_lock:
            _children.setdefault(proc.pid, proc)
        return None if proc.poll() is not None else identify(proc.pid)
    if not alive(proc):
        _reap(proc.pid)
        return None
    return proc


def _signal(proc: Identified, sig: int) -> None:
    if alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _gone(proc: Identified) -> bool:
    _reap(proc.pid)
    return not alive(proc)


def _reap(pid: int) -> None:
    """Collects the exit of a child of this process, so that it leaves no zombie."""
    with _children_lock:
        child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            with _children_lock:
                _children.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
