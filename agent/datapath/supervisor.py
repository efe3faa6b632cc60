"""Finds the userspace engine serving the device, and starts it when that is the agent's job.

In `child` mode the agent starts the engine as a process that outlives the agent: its own
session, never signalled or waited for by the agent, so the next agent finds the engine's live
UAPI socket and carries on configuring it. Starting is done when the socket answers. A
container's restart still kills it with the agent, as it kills every process of the container.

In `external` mode (the chart's, for the userspace datapath) the agent never starts an engine:
the engine's own DaemonSet runs it beside the agent, sharing the socket folder through a host
path, so restarting or upgrading the agent's container leaves the engine and its traffic alone.
The agent waits for the socket, saying what it waits for, while the fail-closed backstop holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Final

from podwire.agent import log
from podwire.agent.datapath import uapi

START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0  # for the engine to end on SIGTERM, at uninstall
# In external mode: how often the agent looks for the engine's socket, and says it still waits.
EXTERNAL_POLL: Final = 0.2
EXTERNAL_REPORT_EVERY: Final = 30.0
# The engine's log on the host: past this size it becomes `<log>.1` (replacing the one before)
# and a new log begins, at a start here and while the engine runs (its own rotation), so the
# two together stay near twice this.
LOG_LIMIT = 16 * 1024 * 1024


def rotate_log(path: pathlib.Path, *, limit: int) -> None:
    """Moves a log past limit bytes to `<path>.1`; call before opening it for a new engine."""
    try:
        if path.stat().st_size <= limit:
            return
    except FileNotFoundError:
        return
    os.replace(path, path.with_name(path.name + ".1"))


def default_command() -> tuple[str, ...]:
    """The podwire-engine console script installed next to this Python."""
    return (str(pathlib.Path(sys.executable).parent / "podwire-engine"),)


@dataclasses.dataclass
class Engine:
    device: str
    client: uapi.UapiClient
    command: tuple[str, ...] = dataclasses.field(default_factory=default_command)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    log_path: pathlib.Path | None = None
    netns: str | None = None
    start_timeout: float = START_TIMEOUT
    process: subprocess.Popen[bytes] | None = None  # only when this agent started it
    external: bool = False  # never start one: the engine's own DaemonSet runs it
    found: bool = False  # an engine has answered this agent
    # Set when the agent is told to stop: a wait for the engine's DaemonSet ends with it, so a
    # SIGTERM before the engine came is obeyed at once, not after the kubelet's grace period.
    stop: threading.Event | None = None

    def ensure_running(self) -> None:
        """An engine serves the device's socket: the one found there, or (in child mode) one
        started now. In external mode the first call waits until the engine's DaemonSet
        serves it (the agent has nothing to do before); later calls, the watchdog's after the
        engine went away, raise at once, so the control loop keeps turning and the agent's
        health says what is missing."""
        if self.client.alive():
            self.found = True
            return
        if not self.external:
            self._start()
        elif self.found:
            raise uapi.UapiError(
                self.device, "find the engine", errno.ENOENT, self.absent_message()
            )
        else:
            self._wait_for_external()
        self.found = True

    def stop_engine(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """Ends the engine that serves the device (this agent's child, or the one an earlier
        agent started, found by its socket) with SIGTERM, SIGKILL after `timeout`; its TUN
        link goes with it. Only at uninstall: a restart leaves the engine running. In external
        mode the engine belongs to its DaemonSet, which ends it."""
        if self.external:
            return
        pid = self.process.pid if self.process is not None else self.client.engine_pid()
        if pid is None:
            return
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid, self.process) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running(pid, self.process):
            _signal(pid, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.client.path.unlink()  # an engine ended by SIGKILL leaves its socket

    def absent_message(self) -> str:
        """What the agent waits for in external mode, for its log and its health line."""
        return (
            f"no userspace engine serves {self.client.path} (engine mode external: the agent"
            " starts none; the engine's DaemonSet runs podwire-engine on this node);"
            " fail-closed holds meanwhile"
        )

    def _wait_for_external(self) -> None:
        logger = log.get("datapath")
        reported = float("-inf")
        while not self.client.alive():
            if time.monotonic() - reported >= EXTERNAL_REPORT_EVERY:
                logger.warning("engine_absent", device=self.device, reason=self.absent_message())
                reported = time.monotonic()
            if self.stop is not None and self.stop.wait(EXTERNAL_POLL):
                raise uapi.UapiError(
                    self.device, "find the engine", errno.ECANCELED, "the agent is stopping"
                )
            if self.stop is None:
                time.sleep(EXTERNAL_POLL)
        logger.info("engine_found", device=self.device)

    def _start(self) -> None:
        args: Sequence[str] = [*self.command, self.device]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        if self.log_path:
            rotate_log(self.log_path, limit=LOG_LIMIT)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # Its own session: the engine outlives the agent. Foreground, so its log is ours.
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1", **self._log_env(), **self.env},
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self._wait_for_socket(self.process)

    def _log_env(self) -> dict[str, str]:
        """The engine writes its own log to the host file and rotates it while it runs; what
        it prints besides (a traceback) still lands in the file through stdout."""
        if self.log_path is None:
            return {}
        return {
            "PODWIRE_ENGINE_LOG_FILE": str(self.log_path),
            "PODWIRE_ENGINE_LOG_MAX_BYTES": str(LOG_LIMIT),
        }

    def _wait_for_socket(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.client.alive():
            if process.poll() is not None:
                raise uapi.UapiError(
                    self.device,
                    "start the engine",
                    errno.EIO,
                    f"it exited with {process.returncode}",
                )
            if time.monotonic() > deadline:
                raise uapi.UapiError(
                    self.device,
                    "start the engine",
                    errno.ETIMEDOUT,
                    f"no UAPI socket after {self.start_timeout}s",
                )
            time.sleep(0.05)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _running(pid: int, process: subprocess.Popen[bytes] | None) -> bool:
    """Whether pid still runs: a child of ours is reaped by poll, anyone else's is asked."""
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
