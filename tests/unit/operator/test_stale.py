"""A WireguardNode goes only after its Node has been absent for the whole grace."""

from __future__ import annotations

from podwire.operator import stale


def test_removed_once_the_node_has_been_gone_for_the_grace() -> None:
    t = stale.StaleTracker(grace=30)
    assert t.update(["a", "b"], ["a"], now=100) == []
    assert t.update(["a", "b"], ["a"], now=129) == []
    assert t.update(["a", "b"], ["a"], now=130) == ["b"]


def test_a_node_back_within_the_grace_starts_the_count_afresh() -> None:
    t = stale.StaleTracker(grace=30)
    t.update(["a"], [], now=100)
    assert t.update(["a"], ["a"], now=110) == []  # re-created
    assert t.update(["a"], [], now=135) == []  # gone again: 0 s, not 35 s
    assert t.update(["a"], [], now=165) == ["a"]


def test_a_new_leader_counts_from_its_own_first_look() -> None:
    t = stale.StaleTracker(grace=30)
    t.update(["a"], [], now=100)
    t.forget()
    assert t.update(["a"], [], now=140) == []
    assert t.update(["a"], [], now=170) == ["a"]
