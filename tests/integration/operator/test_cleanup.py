"""What the leader keeps tidy: WireguardNodes whose Node is gone, and clashing keys and CIDRs."""

from __future__ import annotations

import functools
import time

from tests.integration.operator.conftest import Objects, Operators, public_key, wait_for

GRACE = 3.0


def test_a_wireguardnode_whose_node_is_gone_is_removed_after_the_grace(
    operators: Operators, objects: Objects
) -> None:
    kept, orphan, replaced = objects.name("kept"), objects.name("orphan"), objects.name("again")
    for i, name in enumerate((kept, replaced), start=1):
        objects.node(name, pod_cidrs=[f"10.251.{i}.0/24"])
        objects.wgnode(name)
    objects.wgnode(orphan)  # made by hand: no Node, no ownerReference
    op = operators.start("op-stale", f"--stale-grace={GRACE:g}s")
    wait_for(op.leading, timeout=10, what="leading")
    seen = time.monotonic()

    wait_for(lambda: objects.get(orphan) is None, timeout=GRACE + 10, what="the orphan removed")
    assert time.monotonic() - seen >= GRACE - 1  # not before its grace
    # A Node deleted and made again within the grace (a machine replaced) keeps its object.
    objects.delete_node(replaced)
    time.sleep(GRACE / 3)
    objects.node(replaced, pod_cidrs=["10.251.2.0/24"])
    time.sleep(GRACE + 2)
    assert objects.get(replaced) is not None
    assert objects.get(kept) is not None

    objects.delete_node(kept)
    wait_for(lambda: objects.get(kept) is None, timeout=GRACE + 10, what="the stale one removed")
    assert op.metrics()["podwire_operator_stale_removed_total"] == 2.0
    events = objects.events(orphan)
    assert [e["reason"] for e in events] == ["StaleRemoved"]
    assert events[0]["source"]["component"] == "podwire-operator"
    assert f"its Node {orphan} has been gone" in events[0]["message"]


def test_duplicate_keys_and_overlapping_pod_cidrs_are_flagged_and_cleared(
    operators: Operators, objects: Objects
) -> None:
    a, b, c, d = (objects.name(x) for x in "abcd")
    key = public_key()
    cidrs = {a: "10.252.1.0/24", b: "10.252.2.0/24", c: "10.252.3.0/24", d: "10.252.3.128/25"}
    for name, cidr in cidrs.items():
        objects.node(name, pod_cidrs=[cidr])
    objects.wgnode(a, key=key)
    objects.wgnode(b, key=key)
    objects.wgnode(c)
    objects.wgnode(d)
    # The agent's own conditions stay as they are: the operator owns only Conflict.
    ready = {"type": "Ready", "status": "True", "reason": "Ready", "message": "up", "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    objects.status(a, conditions=[ready])
    op = operators.start("op-conflicts", "--stale-grace=60s")
    wait_for(op.leading, timeout=10, what="leading")

    def conflict(name: str) -> dict[str, str] | None:
        return objects.condition(name, "Conflict")

    wait_for(lambda: conflict(a) and conflict(d), timeout=10, what="the conflicts flagged")
    wait_for(lambda: conflict(b) and conflict(c), timeout=5, what="the conflicts flagged")
    got_a = conflict(a)
    assert got_a is not None
    assert (got_a["status"], got_a["reason"]) == ("True", "DuplicateKey")
    assert b in got_a["message"]
    got_c = conflict(c)
    assert got_c is not None
    assert (got_c["status"], got_c["reason"]) == ("True", "OverlappingPodCIDR")
    assert d in got_c["message"] and "10.252.3.128/25" in got_c["message"]
    assert objects.condition(a, "Ready") == ready
    for name, reason in ((a, "DuplicateKey"), (b, "DuplicateKey"), (c, "OverlappingPodCIDR"), (d, "OverlappingPodCIDR")):  # fmt: skip
        assert [e["reason"] for e in objects.events(name)] == [reason], name
        assert objects.events(name)[0]["type"] == "Warning"
    metrics = op.metrics()
    assert metrics['podwire_operator_conflicts{reason="DuplicateKey"}'] >= 2
    assert metrics['podwire_operator_conflicts{reason="OverlappingPodCIDR"}'] >= 2

    # b takes a key of its own; d's Node goes (a Node's pod CIDRs never change), and with it
    # its claim on the CIDR, while its WireguardNode waits out the grace.
    objects.cp.kubectl("patch", "wgnode", b, "--type=merge", "-p", f'{{"spec":{{"publicKey":"{public_key()}"}}}}')  # fmt: skip
    objects.delete_node(d)

    def cleared(name: str) -> bool:
        got = conflict(name)
        return got is not None and (got["status"], got["reason"]) == ("False", "NoConflict")

    for name in (a, b, c, d):
        wait_for(functools.partial(cleared, name), timeout=10, what=f"{name}'s conflict cleared")
    assert objects.condition(a, "Ready") == ready
    assert sorted(e["reason"] for e in objects.events(a)) == ["ConflictResolved", "DuplicateKey"]
    time.sleep(2)  # passes go on; nothing is written or reported again
    assert len(objects.events(a)) == 2
