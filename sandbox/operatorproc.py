"""The sandbox's operator: podwire-operator replicas as plain processes on the host.

They run as the agents do (sandbox.topology): detached through the supervisor, written into the
sandbox's record with their command line, so that `status` finds them from any later process,
`down` stops exactly them, and one can be started again as it was. Each has its own identity in
the Lease and its own /metrics port on loopback, which is how `status` tells who leads.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from podwire.sandbox import controlplane, record, supervisor

ROLE = "operator"
BIN = pathlib.Path(sys.executable).parent
# Where the sandbox's `helm template podwire` (no -n) puts the operator's ServiceAccount and its
# Lease Role: with a token of default/podwire-operator as kubeconfig it runs under the chart's RBAC.
NAMESPACE = "default"
# Short enough that a sandbox shows a takeover and a stale object's removal while one watches.
DEFAULT_FLAGS = ("--stale-grace=10s", "--rotation-deadline=60s")


@dataclasses.dataclass(frozen=True, slots=True)
class Replica:
    """One operator replica as `podwire sandbox status` shows it."""

    identity: str
    pid: int
    alive: bool
    metrics_port: int
    leader: bool
    ready: bool


def start(
    rec: record.Record,
    *,
    kubeconfig: pathlib.Path,
    workdir: pathlib.Path,
    replicas: int = 2,
    namespace: str = NAMESPACE,
    flags: Sequence[str] = DEFAULT_FLAGS,
) -> list[record.Process]:
    """Starts `replicas` operators (operator1, operator2, ...) against the sandbox's apiserver,
    logs in workdir/<identity>.log, each recorded (and the record checkpointed) as it starts."""
    started = []
    for i in range(1, replicas + 1):
        identity = f"operator{i}"
        argv = [
            str(BIN / "podwire-operator"),
            f"--kubeconfig={kubeconfig}",
            f"--namespace={namespace}",
            f"--identity={identity}",
            f"--metrics-address=127.0.0.1:{controlplane.free_port()}",
            *flags,
        ]
        log = workdir / f"{identity}.log"
        proc = record.launch(ROLE, argv, log=log, env={"PYTHONUNBUFFERED": "1"})
        rec.processes.append(proc)
        rec.checkpoint()
        started.append(proc)
    return started


def stop(rec: record.Record) -> None:
    """Stops every operator in the record (SIGTERM: the leader gives the lease up)."""
    procs = rec.find(ROLE)
    supervisor.stop_all(procs)
    rec.processes = [p for p in rec.processes if p not in procs]
    rec.checkpoint()


def status(rec: record.Record) -> list[Replica]:
    """Each recorded operator: alive, and leading and ready as its own /metrics and /readyz say."""
    out = []
    for proc in rec.find(ROLE):
        port = _port(proc.argv)
        alive = proc.alive()
        out.append(
            Replica(
                identity=_flag(proc.argv, "--identity") or str(proc.pid),
                pid=proc.pid,
                alive=alive,
                metrics_port=port,
                leader=alive and "podwire_operator_leader 1.0" in _get(port, "/metrics"),
                ready=alive and _get(port, "/readyz").startswith("ready"),
            )
        )
    return out


def _flag(argv: Sequence[str], name: str) -> str:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(name + "=")), "")


def _port(argv: Sequence[str]) -> int:
    port = _flag(argv, "--metrics-address").rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def _get(port: int, path: str) -> str:
    if not port:
        return ""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as e:
        return str(e.read().decode())
    except OSError:
        return ""
