"""The device watchdog: a device that vanished or was replaced is brought back.

The engine can die, or someone can delete the link. The control loop asks every second whether
the device is still the one it programmed (a cheap identity: ifindex, and the UAPI socket's
inode for the engine). If not, the device is brought back with the node's key and port and the
reconciler's record is dropped, so the next pass reads it back and programs every peer and
route again. Meanwhile the fail-closed backstop drops the traffic that lost its tunnel.
"""

from __future__ import annotations

from podwire.agent import component, events, log, reconciler
from podwire.agent.datapath import component as datapath_mod


class Watchdog:
    name = "watchdog"

    def __init__(
        self,
        *,
        datapath: datapath_mod.Datapath,
        reconciler: reconciler.Reconciler,
        recorder: events.Recorder,
    ) -> None:
        self.datapath = datapath
        self.reconciler = reconciler
        self.recorder = recorder
        self.restarts = 0  # times the device was found gone or replaced
        self.last_error = ""
        self.log = log.get("watchdog")

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def check(self) -> bool:
        """Brings the device back if it is gone or was replaced; True if it had to."""
        if self.datapath.backend is None or not self.datapath.lost():
            return False
        self.restarts += 1
        device = self.datapath.device
        self.log.warning("device_lost", device=device)
        self.recorder.record("Warning", "DeviceLost", f"device {device} was gone; restoring")
        self.reconciler.forget_device()
        try:
            self.datapath.restore()
        except Exception as e:  # tried again on the next check
            self.last_error = f"bring the device back: {e}"
            self.log.error("device_restore_failed", error=str(e))
        else:
            self.last_error = ""
            self.log.info("device_restored", device=device)
        return True

    def health(self) -> component.Health:
        if self.last_error:
            return component.degraded(self.last_error)
        return component.ok(f"device present; brought back {self.restarts} times")
