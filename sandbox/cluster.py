"""`podwire sandbox`: a whole podwire cluster on one machine.

So far the sandbox brings up its control plane (etcd and the real kube-apiserver) and says
plainly what is not built yet; the node namespaces, the agents and the encryption proof arrive
with the agent and sandbox issues.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
from dataclasses import dataclass

from podwire.sandbox import controlplane, tools

DEFAULT_DIR = pathlib.Path(os.environ.get("PODWIRE_SANDBOX_DIR", "/run/podwire-sandbox"))

NOT_BUILT_YET = (
    "node namespaces, pods and agents in the sandbox (the sandbox issue; the agent itself runs"
    " three nodes in tests/integration/agent)",
    "the encryption proof, `podwire sandbox verify` (the sandbox issue)",
)


class SandboxError(RuntimeError):
    """A sandbox step failed; the message names the step."""


@dataclass
class Sandbox:
    directory: pathlib.Path = DEFAULT_DIR

    @property
    def control_plane_dir(self) -> pathlib.Path:
        return self.directory / "controlplane"

    def up(self, *, out: object = sys.stdout) -> controlplane.ControlPlane:
        existing = controlplane.ControlPlane.load(self.control_plane_dir)
        if existing and existing.running():
            raise SandboxError(
                f"a sandbox is already running (kubeconfig {existing.kubeconfig}); "
                "`podwire sandbox down` removes it"
            )
        if existing:
            existing.stop()  # the remains of one that died: clear them before starting anew
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, mode=0o700)
        _say(out, "starting etcd and kube-apiserver ...")
        cp = controlplane.ControlPlane(self.control_plane_dir)
        try:
            cp.start()
        except controlplane.ControlPlaneError as e:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise SandboxError(f"step 'control plane' failed: {e}") from e
        _say(out, f"control plane ready at {cp.url}")
        _say(out, "")
        _say(out, f"  export KUBECONFIG={cp.kubeconfig} PATH={tools.BUILT}:$PATH")
        _say(out, "  kubectl get --raw /readyz")
        _say(out, "")
        _say(out, "Not built yet, so not started:")
        for item in NOT_BUILT_YET:
            _say(out, f"  - {item}")
        _say(out, "Remove everything with `podwire sandbox down`.")
        return cp

    def down(self, *, out: object = sys.stdout) -> None:
        cp = controlplane.ControlPlane.load(self.control_plane_dir)
        if cp is not None:
            cp.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        _say(out, "sandbox removed")

    def status(self) -> dict[str, object]:
        cp = controlplane.ControlPlane.load(self.control_plane_dir)
        if cp is None:
            return {"running": False}
        return {
            "running": cp.running(),
            "kubeconfig": str(cp.kubeconfig),
            "apiserver": cp.url,
            "nodes": [],
            "pods": [],
            "not_built_yet": list(NOT_BUILT_YET),
        }


def _say(out: object, line: str) -> None:
    print(line, file=out, flush=True)  # type: ignore[call-overload]


def print_status(status: dict[str, object], *, as_json: bool, out: object = sys.stdout) -> None:
    if as_json:
        _say(out, json.dumps(status, indent=2))
        return
    if not status["running"]:
        _say(out, "no sandbox is running")
        return
    _say(out, f"apiserver:  {status['apiserver']}")
    _say(out, f"kubeconfig: {status['kubeconfig']}")
    _say(out, "not built yet: " + "; ".join(status["not_built_yet"]))  # type: ignore[arg-type]
