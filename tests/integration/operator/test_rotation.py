"""The rolling key rotation against the real apiserver, with the agents' side played by the test.

An agent rotates when the rotate-key-requested-at annotation on its WireguardNode is newer than
its status.keyRotatedAt; it then reports keyRotatedAt, peers, and peersOnCurrentKey as its
peers complete handshakes with the new key. `FakeAgents` does exactly that through the status
subresource (a second after rotating, every peer is on the new key), for the nodes it is told
to answer for; agents with real datapaths are the agent's own tests' business.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.operator.conftest import Objects, Operators, wait_for

QUEUED = "podwire.io/rotation-queued-at"
REQUESTED = "podwire.io/rotate-key-requested-at"
PEERS = 2
HANDSHAKES_AFTER = 1.0


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # fmt: skip


def epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


class FakeAgents:
    """Answers rotation requests for the nodes in `answering`; watches that at most one node's
    rotation is under way at any time."""

    def __init__(self, objects: Objects, names: list[str], answering: set[str]) -> None:
        self.objects = objects
        self.names = names
        self.answering = answering
        self.rotated: dict[str, float] = {}  # node -> when it rotated (our clock)
        self.order: list[str] = []
        self.most_at_once = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeAgents:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            out = self.objects.cp.kubectl("get", "wgnodes", *self.names, "-o", "json", check=False)
            if out.returncode != 0:
                continue
            items = json.loads(out.stdout)["items"]
            self.most_at_once = max(self.most_at_once, sum(1 for o in items if _under_way(o)))
            for obj in items:
                self._answer(obj)

    def _answer(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        requested = (obj["metadata"].get("annotations") or {}).get(REQUESTED)
        if name not in self.answering or not requested:
            return
        rotated_at = status.get("keyRotatedAt")
        if rotated_at is None or epoch(requested) > epoch(rotated_at):
            now = time.time()
            self.objects.status(name, keyRotatedAt=rfc3339(max(now, epoch(requested))), peers=PEERS, peersOnCurrentKey=0)  # fmt: skip
            self.rotated[name] = now
            self.order.append(name)
        elif status.get("peersOnCurrentKey") != PEERS and time.time() - self.rotated.get(name, 0) >= HANDSHAKES_AFTER:  # fmt: skip
            self.objects.status(name, peersOnCurrentKey=PEERS)


def _under_way(obj: dict[str, Any]) -> bool:
    notes = obj["metadata"].get("annotations") or {}
    if QUEUED not in notes or REQUESTED not in notes or epoch(notes[REQUESTED]) < epoch(notes[QUEUED]):  # fmt: skip
        return False
    status = obj.get("status") or {}
    rotated = status.get("keyRotatedAt")
    done = rotated and epoch(rotated) >= epoch(notes[REQUESTED]) and status.get("peersOnCurrentKey") == status.get("peers")  # fmt: skip
    return not done


@pytest.fixture
def nodes(objects: Objects) -> Iterator[list[str]]:
    names = [objects.name(f"n{i}") for i in range(1, 4)]
    for i, name in enumerate(names, start=1):
        objects.node(name, pod_cidrs=[f"10.253.{i}.0/24"])
        objects.wgnode(name)
        objects.status(name, keyRotatedAt=rfc3339(time.time() - 60), peers=PEERS, peersOnCurrentKey=PEERS)  # fmt: skip
    yield names


def _annotations(objects: Objects, name: str) -> dict[str, str]:
    obj = objects.get(name) or {}
    notes: dict[str, str] = obj.get("metadata", {}).get("annotations") or {}
    return notes


def test_rotate_all_rotates_every_queued_node_one_at_a_time(
    operators: Operators, objects: Objects, nodes: list[str]
) -> None:
    # What `podwire rotate-key --all` does: every node queued at once.
    queued = rfc3339(time.time())
    for name in reversed(nodes):
        objects.annotate(name, **{QUEUED: queued})
    with FakeAgents(objects, nodes, set(nodes)) as agents:
        op = operators.start("op-rotate")
        wait_for(lambda: all(QUEUED not in _annotations(objects, n) for n in nodes), timeout=60, what="every rotation done")  # fmt: skip

    assert agents.order == nodes  # queued in the same second: by name
    assert agents.most_at_once == 1
    for name in nodes:
        cond = objects.condition(name, "KeyRotation")
        assert cond is not None and (cond["status"], cond["reason"]) == ("True", "Completed"), cond
        reasons = sorted(e["reason"] for e in objects.events(name))
        assert reasons == ["KeyRotated", "KeyRotationRequested"], (name, reasons)
    assert op.metrics()['podwire_operator_rotations_total{result="done"}'] == 3.0
    time.sleep(2)
    assert agents.order == nodes  # nothing is rotated twice


def test_a_node_that_misses_the_deadline_is_reported_and_skipped(
    operators: Operators, objects: Objects, nodes: list[str]
) -> None:
    stuck, fine, _ = nodes
    now = time.time()
    objects.annotate(stuck, **{QUEUED: rfc3339(now - 20)})  # first in the queue
    objects.annotate(fine, **{QUEUED: rfc3339(now - 10)})
    with FakeAgents(objects, nodes, {fine}) as agents:  # stuck's agent is stopped
        op = operators.start("op-deadline", "--rotation-deadline=4s")
        wait_for(lambda: QUEUED not in _annotations(objects, fine), timeout=30, what="the next node rotated")  # fmt: skip

    cond = objects.condition(stuck, "KeyRotation")
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "Deadline"), cond
    assert "did not complete within 4s" in cond["message"]
    assert "its agent has not rotated" in cond["message"]
    # Out of the queue, and the request withdrawn: an agent that comes back later does not
    # rotate while another node does.
    assert QUEUED not in _annotations(objects, stuck)
    assert REQUESTED not in _annotations(objects, stuck)
    warnings = [e for e in objects.events(stuck) if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["KeyRotationTimedOut"]
    assert agents.order == [fine]
    assert agents.most_at_once == 1
    metrics = op.metrics()
    assert metrics['podwire_operator_rotations_total{result="timed_out"}'] == 1.0
    assert metrics['podwire_operator_rotations_total{result="done"}'] == 1.0


def test_keys_older_than_the_interval_are_rotated_on_schedule(
    operators: Operators, objects: Objects, nodes: list[str]
) -> None:
    old, fresh, _ = nodes
    objects.status(old, keyRotatedAt=rfc3339(time.time() - 7200))  # two hours old
    with FakeAgents(objects, nodes, set(nodes)) as agents:
        op = operators.start("op-schedule", "--key-rotation-interval=1h")
        wait_for(lambda: agents.order == [old] and QUEUED not in _annotations(objects, old), timeout=30, what="the old key rotated")  # fmt: skip
        time.sleep(3)

    assert agents.order == [old]  # the others' keys are a minute old
    assert REQUESTED not in _annotations(objects, fresh)
    cond = objects.condition(old, "KeyRotation")
    assert cond is not None and cond["status"] == "True"
    assert op.metrics()['podwire_operator_rotations_total{result="done"}'] == 1.0


def test_a_new_leader_carries_on_the_rotation_where_the_old_one_stopped(
    operators: Operators, objects: Objects, nodes: list[str]
) -> None:
    queued = rfc3339(time.time())
    for name in nodes:
        objects.annotate(name, **{QUEUED: queued})
    fast = ("--lease-duration=4s", "--renew-period=1s")
    with FakeAgents(objects, nodes, set()) as agents:  # nobody answers yet
        first = operators.start("op-first", *fast)
        wait_for(lambda: REQUESTED in _annotations(objects, nodes[0]), timeout=10, what="the first node requested")  # fmt: skip
        second = operators.start("op-second", *fast)
        first.kill()
        wait_for(second.leading, timeout=10, what="the second replica leading")
        agents.answering.update(nodes)
        wait_for(lambda: all(QUEUED not in _annotations(objects, n) for n in nodes), timeout=60, what="every rotation done")  # fmt: skip

    assert agents.order == nodes
    assert agents.most_at_once == 1
    assert second.metrics()['podwire_operator_rotations_total{result="done"}'] == 3.0
