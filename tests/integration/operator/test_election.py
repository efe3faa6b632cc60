"""Two operators against the real apiserver: one leads, the other takes over when it stops."""

from __future__ import annotations

import json
import pathlib
import signal
import time

from podwire.sandbox import controlplane
from tests.integration.operator.conftest import Operators, wait_for

LEASE_DURATION = 15.0  # the default, so the takeover measured is the one a cluster sees


def _holder(cp: controlplane.ControlPlane, namespace: str) -> str:
    proc = cp.kubectl(
        "get", "lease", "podwire-operator", "-n", namespace, "-o", "json", check=False
    )
    if proc.returncode != 0:
        return ""
    return str(json.loads(proc.stdout)["spec"].get("holderIdentity") or "")


def test_one_replica_leads_and_both_are_ready(
    crds: controlplane.ControlPlane, namespace: str, operators: Operators
) -> None:
    first = operators.start("op-a")
    wait_for(first.leading, timeout=10, what="the first replica leading")
    second = operators.start("op-b")
    wait_for(lambda: second.get("/readyz")[0] == 200, timeout=10, what="the second ready")

    assert _holder(crds, namespace) == "op-a"
    assert first.metrics()["podwire_operator_leader"] == 1.0
    assert second.metrics()["podwire_operator_leader"] == 0.0
    code, text = second.get("/readyz")
    assert code == 200 and "waiting; op-a leads" in text, text
    assert first.get("/healthz")[0] == 200 and second.get("/healthz")[0] == 200
    time.sleep(6)  # past a renewal: the leader keeps the lease, the other keeps waiting
    assert first.leading() and not second.leading()


def test_the_second_replica_takes_over_within_the_lease_duration_after_kill_9(
    crds: controlplane.ControlPlane, namespace: str, operators: Operators
) -> None:
    leader = operators.start("op-leader")
    wait_for(leader.leading, timeout=10, what="the first replica leading")
    follower = operators.start("op-follower")
    wait_for(lambda: follower.get("/readyz")[0] == 200, timeout=10, what="the follower ready")
    time.sleep(3)  # the follower has watched the lease being renewed

    leader.kill(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(follower.leading, timeout=LEASE_DURATION + 5, what="the follower leading", every=0.1)
    takeover = time.monotonic() - killed
    print(f"takeover after kill -9: {takeover:.2f}s (lease duration {LEASE_DURATION:g}s)")

    assert takeover <= LEASE_DURATION
    assert _holder(crds, namespace) == "op-follower"


def test_a_replica_that_stops_gives_the_lease_up_at_once(
    crds: controlplane.ControlPlane, namespace: str, operators: Operators
) -> None:
    leader = operators.start("op-old")
    wait_for(leader.leading, timeout=10, what="the first replica leading")
    follower = operators.start("op-new")
    wait_for(lambda: follower.get("/readyz")[0] == 200, timeout=10, what="the follower ready")

    leader.kill(signal.SIGTERM)
    stopped = time.monotonic()
    assert leader.proc.returncode == 0
    wait_for(follower.leading, timeout=LEASE_DURATION, what="the follower leading", every=0.1)
    handover = time.monotonic() - stopped
    print(f"handover after SIGTERM: {handover:.2f}s")
    assert handover < 4  # a retry period or so, not a lease duration


def test_a_replica_that_cannot_reach_the_apiserver_is_alive_but_not_ready(
    crds: controlplane.ControlPlane, operators: Operators, tmp_path: pathlib.Path
) -> None:
    config = json.loads(crds.kubectl("config", "view", "--raw", "-o", "json").stdout)
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{controlplane.free_port()}"
    kubeconfig = tmp_path / "nowhere.kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    op = operators.start("op-nowhere", f"--kubeconfig={kubeconfig}")

    wait_for(lambda: op.get("/readyz")[0] == 503, timeout=10, what="/readyz failing")
    _, text = op.get("/readyz")
    assert "not ready: cannot reach the apiserver" in text, text
    assert op.get("/healthz")[0] == 200  # waiting for the apiserver is no reason to restart
    assert not op.leading()
