"""Key rotation as the control loop runs it: asked for by the annotation, in the datapath's
order, recovered after a crash, counted and reported. Driven by hand on the test doubles
(tests/support/agentfakes.py); the e2e tier runs the same against real agents and engines."""

from __future__ import annotations

import copy
import pathlib

import prometheus_client
import pytest
from agentfakes import AgentHarness, other_node

from podwire.agent import keys, metrics, wgdevice
from podwire.api import wgnode


@pytest.fixture
def synced(tmp_path: pathlib.Path) -> AgentHarness:
    h = AgentHarness(tmp_path / "private.key")
    h.start()
    h.list(other_node(2), other_node(3))
    h.step()
    h.local_events()
    return h


def _request(h: AgentHarness, when: float | str) -> None:
    """Sets the rotation annotation on the own WireguardNode, as `podwire rotate-key` does."""
    own = copy.deepcopy(h.api.wgnodes[AgentHarness.NODE])
    text = when if isinstance(when, str) else wgnode.format_precise_time(when)
    own["metadata"].setdefault("annotations", {})[wgnode.ROTATE_ANNOTATION] = text
    h.api.wgnodes[AgentHarness.NODE] = own
    h.wgnodes.put(copy.deepcopy(own))


def _spec_key(h: AgentHarness) -> str:
    return str(h.api.wgnodes[AgentHarness.NODE]["spec"]["publicKey"])


def test_the_annotation_rotates_the_key_once(synced: AgentHarness) -> None:
    old = synced.agent.keys.public_key
    synced.advance(10)
    _request(synced, synced.clock.wall())
    synced.advance(1)
    synced.step()
    new = synced.agent.keys.public_key
    assert new != old
    assert synced.backend.private_key == synced.agent.keys.key.raw, "on the device"
    assert _spec_key(synced) == new, "published"
    assert keys.load_previous(synced.cfg.key_path) is None, "the rotation is complete"
    assert ("Normal", "KeyRotated") in synced.local_events()
    assert synced.controller.rotations_done == 1
    status = synced.api.wgnodes[AgentHarness.NODE]["status"]
    assert status["keyRotatedAt"] == wgnode.format_time(synced.clock.wall())
    for _ in range(3):  # the same annotation never rotates again
        synced.advance(5)
        synced.step()
    assert synced.agent.keys.public_key == new


def test_a_request_older_than_the_key_or_malformed_changes_nothing(synced: AgentHarness) -> None:
    old = synced.agent.keys.public_key
    _request(synced, synced.clock.wall() - 60)
    synced.step()
    _request(synced, "yesterday at noon")
    synced.step()
    _request(synced, synced.clock.wall() + 3600)  # a clock far off
    synced.step()
    assert synced.agent.keys.public_key == old
    assert synced.kube_events("KeyRotationRefused") == [AgentHarness.NODE] * 2
    synced.step()
    assert len(synced.kube_events("KeyRotationRefused")) == 2, "each bad value reported once"


def test_userspace_puts_the_key_on_the_device_before_publishing(synced: AgentHarness) -> None:
    synced.api.down = True  # publishing fails: the device must have the key already
    synced.advance(1)
    _request(synced, synced.clock.wall())
    synced.step()
    assert synced.backend.private_key == synced.agent.keys.key.raw
    assert _spec_key(synced) != synced.agent.keys.public_key
    assert keys.load_previous(synced.cfg.key_path) is not None, "kept until published"
    synced.api.down = False
    synced.step(woke=False)
    assert _spec_key(synced) == synced.agent.keys.public_key
    assert keys.load_previous(synced.cfg.key_path) is None


def test_kernel_too_gets_the_key_on_the_device_then_publishes_and_greets_every_peer(
    synced: AgentHarness,
) -> None:
    synced.backend.datapath = "kernel"
    synced.backend.applied.clear()
    public, _ = synced.controller.rotate_key()
    assert synced.backend.private_key == synced.agent.keys.key.raw
    assert _spec_key(synced) == public
    # Every peer is greeted so the handshakes with the new key start now (the kernel stops
    # sending on its old sessions).
    assert sorted(synced.backend.greeted()) == sorted(synced.peers())
    assert keys.load_previous(synced.cfg.key_path) is None


def test_peers_on_current_key_counts_handshakes_after_the_rotation(synced: AgentHarness) -> None:
    synced.controller.rotate_key()
    synced.step(woke=False)
    status = synced.api.wgnodes[AgentHarness.NODE]["status"]
    assert (status["peers"], status["peersOnCurrentKey"]) == (2, 0)
    synced.advance(1)
    n2 = sorted(synced.peers())[0]
    synced.backend.table = wgdevice.PeerTable(
        [
            p
            if p.public_key != n2
            else wgdevice.Peer(**{**_fields(p), "last_handshake": synced.clock.wall()})
            for p in synced.backend.table.peers()
        ]
    )
    synced.step(woke=False)
    assert synced.api.wgnodes[AgentHarness.NODE]["status"]["peersOnCurrentKey"] == 1


def _fields(p: wgdevice.Peer) -> dict[str, object]:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def test_a_rotation_cut_short_is_finished_at_the_next_start(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "private.key"
    first = AgentHarness(path)
    first.start()
    first.list(other_node(2))
    first.step()
    keys.rotate(path)  # the agent died right after storing the new key
    stored = keys.load(path).public_key_b64()
    second = AgentHarness(path)
    second.api = first.api  # the same apiserver, still holding the old key
    second.agent.publisher.api = first.api
    second.agent.apiserver = first.api
    second.start()
    second.list(other_node(2))
    second.step()
    assert second.agent.keys.public_key == stored
    assert second.backend.private_key == keys.load(path).raw
    assert _spec_key(second) == stored
    assert keys.load_previous(path) is None
    assert ("Normal", "KeyRotated") in second.local_events()


def test_a_second_rotation_waits_for_the_first(synced: AgentHarness) -> None:
    synced.api.down = True
    with pytest.raises(RuntimeError, match="not published yet"):
        synced.controller.rotate_key()  # stored and on the device; publishing goes on
    with pytest.raises(RuntimeError, match="under way"):
        synced.controller.rotate_key()


def test_a_key_that_cannot_be_stored_is_a_failed_rotation(
    synced: AgentHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = synced.agent.keys.public_key

    def refuse(path: object) -> None:
        raise keys.KeyFileError(pathlib.Path("x"), "cannot write a new key (No space left)", "")

    monkeypatch.setattr(keys, "rotate", refuse)
    with pytest.raises(keys.KeyFileError):
        synced.controller.rotate_key()
    assert synced.agent.keys.public_key == old and _spec_key(synced) == old
    assert synced.controller.rotations_failed == 1
    assert ("Warning", "KeyRotationFailed") in synced.local_events()


def _metric(h: AgentHarness, name: str, **labels: str) -> float | None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.AgentCollector(h.agent))
    return registry.get_sample_value(name, labels)


def test_metrics_tell_the_key_age_and_the_rotations(synced: AgentHarness) -> None:
    synced.advance(120)
    assert _metric(synced, "podwire_key_age_seconds") == 120
    synced.controller.rotate_key()
    assert _metric(synced, "podwire_key_age_seconds") == 0
    assert _metric(synced, "podwire_key_rotations_total", result="done") == 1
    assert _metric(synced, "podwire_key_rotations_total", result="failed") == 0
    assert _metric(synced, "podwire_peers_on_current_key") == 0


def test_a_request_from_a_clock_ahead_is_answered_with_a_key_no_older_than_it(
    synced: AgentHarness,
) -> None:
    """The operator compares status.keyRotatedAt with the time it asked at, by its own clock:
    a node whose clock is behind must still show a key at least as new as the request, or the
    operator would wait for it until its deadline."""
    ahead = synced.clock.wall() + 30  # the requester's clock is 30 s ahead of this node's
    _request(synced, ahead)
    synced.step()
    status = synced.api.wgnodes[AgentHarness.NODE]["status"]
    assert wgnode.parse_time(status["keyRotatedAt"]) >= int(ahead)
    assert synced.agent.keys.made_wall >= ahead
    assert keys.made_at(synced.cfg.key_path) >= int(ahead), "a restart reports the same age"
