"""Starts the userspace engine as a process that outlives the agent.

The engine runs in its own session and is never signalled or waited for by the agent:
restarting the agent must not cut traffic, so the next agent finds the engine's live UAPI
socket and carries on configuring it. Starting is done when the socket answers.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Final

from podwire.agent.datapath import uapi

START_TIMEOUT: Final = 15.0
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

    def ensure_running(self) -> None:
        """An engine serves the device's socket: the one found there, or one started now."""
        if not self.client.alive():
            self._start()

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
