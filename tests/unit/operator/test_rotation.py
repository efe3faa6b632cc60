"""The rolling rotation's plan: one node at a time, in queue order, done or skipped at the
deadline, and the schedule; all read from the objects, so any replica can carry on."""

from __future__ import annotations

from typing import Any

from podwire.api import wgnode
from podwire.operator import rotation

NOW = 1_767_225_600.0
DEADLINE, DAY = 120.0, 86400.0


def obj(
    name: str,
    *,
    queued: float | None = None,
    requested: float | None = None,
    rotated: float | None = None,
    peers: int = 2,
    on_new_key: int | None = None,
    created: float = NOW - 60,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    notes = {}
    if queued is not None:
        notes[rotation.QUEUE_ANNOTATION] = wgnode.format_time(queued)
    if requested is not None:
        notes[rotation.REQUEST_ANNOTATION] = wgnode.format_time(requested)
    status: dict[str, Any] = {"peers": peers, "conditions": conditions or []}
    if rotated is not None:
        status["keyRotatedAt"] = wgnode.format_time(rotated)
        status["peersOnCurrentKey"] = peers if on_new_key is None else on_new_key
    return {
        "metadata": {
            "name": name,
            "annotations": notes,
            "creationTimestamp": wgnode.format_time(created),
        },
        "status": status,
    }


def plan(*objs: dict[str, Any], now: float = NOW, interval: float = 0.0) -> list[tuple[str, str]]:
    nodes = [rotation.read(o) for o in objs]
    return [
        (a.kind, a.name)
        for a in rotation.plan(nodes, now=now, deadline=DEADLINE, interval=interval)
    ]


def test_the_first_queued_starts_and_nothing_else() -> None:
    assert plan(obj("b", queued=NOW - 5), obj("a", queued=NOW - 1), obj("c")) == [("start", "b")]


def test_queued_in_the_same_second_go_by_name() -> None:
    nodes = [rotation.read(obj(n, queued=NOW)) for n in ("n3", "n1", "n2")]
    assert [n.name for n in rotation.queue_order(nodes)] == ["n1", "n2", "n3"]


def test_while_one_is_under_way_the_others_wait() -> None:
    under_way = obj("a", queued=NOW - 10, requested=NOW - 5)
    rotated_not_handshaken = obj(
        "a", queued=NOW - 10, requested=NOW - 5, rotated=NOW - 4, on_new_key=1
    )
    for a in (under_way, rotated_not_handshaken):
        assert plan(a, obj("b", queued=NOW - 10)) == []


def test_done_when_rotated_after_the_request_and_every_peer_is_on_the_new_key() -> None:
    done = obj("a", queued=NOW - 10, requested=NOW - 5, rotated=NOW - 5)
    assert plan(done, obj("b", queued=NOW - 10)) == [("done", "a"), ("start", "b")]


def test_a_key_from_before_the_request_is_not_a_rotation() -> None:
    stale = obj("a", queued=NOW - 10, requested=NOW - 5, rotated=NOW - 6)
    assert plan(stale) == []


def test_an_older_request_does_not_count_as_started() -> None:
    # Rotated by hand last week, queued now: it still needs its turn.
    assert plan(obj("a", queued=NOW - 1, requested=NOW - 7 * DAY, rotated=NOW - 7 * DAY)) == [
        ("start", "a")
    ]


def test_past_the_deadline_the_node_is_skipped_and_the_next_starts() -> None:
    late = obj("a", queued=NOW - 200, requested=NOW - DEADLINE)
    assert plan(late, obj("b", queued=NOW - 200)) == [("timed_out", "a"), ("start", "b")]
    action = rotation.plan([rotation.read(late)], now=NOW, deadline=DEADLINE, interval=0)[0]
    assert action.withdraw  # its agent never rotated: the request goes too
    assert "did not complete within 120s: its agent has not rotated its key" in action.message


def test_a_node_that_rotated_but_whose_peers_lag_keeps_its_request_when_skipped() -> None:
    late = obj("a", queued=NOW - 200, requested=NOW - DEADLINE, rotated=NOW - 100, on_new_key=1)
    (action,) = rotation.plan([rotation.read(late)], now=NOW, deadline=DEADLINE, interval=0)
    assert (action.kind, action.withdraw) == ("timed_out", False)
    assert "1 of 2 peers have a handshake on the new key" in action.message


def test_the_schedule_queues_keys_older_than_the_interval() -> None:
    old = obj("old", rotated=NOW - DAY - 1)
    young = obj("young", rotated=NOW - 60)
    never = obj("never", created=NOW - 2 * DAY)  # no rotation yet: its age is the object's
    assert plan(old, young, never, interval=DAY) == [("queue", "old"), ("queue", "never"), ("start", "never")]  # fmt: skip


def test_off_means_off() -> None:
    assert plan(obj("old", rotated=NOW - 365 * DAY)) == []


def test_a_node_that_timed_out_is_not_scheduled_again_within_the_interval() -> None:
    cond = {"type": "KeyRotation", "status": "False", "reason": "Deadline", "message": "", "lastTransitionTime": wgnode.format_time(NOW - 3600)}  # fmt: skip
    stuck = obj("stuck", rotated=NOW - 2 * DAY, conditions=[cond])
    assert plan(stuck, interval=DAY) == []
    assert plan(stuck, interval=DAY, now=NOW + DAY) == [("queue", "stuck"), ("start", "stuck")]


def test_an_unreadable_queue_mark_still_queues_first() -> None:
    odd = obj("z")
    odd["metadata"]["annotations"][rotation.QUEUE_ANNOTATION] = "soon"
    assert plan(obj("a", queued=NOW - 5), odd) == [("start", "z")]
