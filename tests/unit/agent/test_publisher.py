"""The node's own WireguardNode kept true: a spec someone else changed is put back and reported,
and a rotated key is retried until the device and the WireguardNode hold the same one.

Driven on `agentfakes.AgentHarness`, as the controller's tests are: the fake apiserver is the
cluster, `edit_wgnode` is an admin (or a rogue agent) writing the object, and the watch
delivers every write to the agent.
"""

from __future__ import annotations

import pathlib
from typing import Any

import agentfakes
import prometheus_client
import pytest
import structlog.testing

from podwire.agent import metrics
from podwire.api import wgnode

AgentHarness = agentfakes.AgentHarness
NODE = AgentHarness.NODE


@pytest.fixture
def h(tmp_path: pathlib.Path) -> AgentHarness:
    """An agent that has published its key and synced with one other node."""
    harness = AgentHarness(tmp_path / "private.key")
    harness.start()
    harness.list(agentfakes.other_node(2))
    harness.step()
    assert harness.agent.publisher.published
    harness.local_events()
    return harness


def spec(h: AgentHarness) -> dict[str, Any]:
    return dict(h.api.wgnodes[NODE]["spec"])


def repairs_metric(h: AgentHarness) -> float | None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.AgentCollector(h.agent))
    return registry.get_sample_value("podwire_wireguardnode_repairs_total")


def refuse_spec_writes(h: AgentHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of the spec answer 500 (the status subresource and reads still work)."""

    def refused(body: dict[str, Any]) -> dict[str, Any]:
        raise agentfakes.FakeApiError("Internal error: etcd timed out", status=500)

    monkeypatch.setattr(h.api, "replace_wgnode", refused)


# 1. A spec someone else changed


def test_a_port_changed_by_someone_else_is_put_back_and_reported(h: AgentHarness) -> None:
    ours = spec(h)
    h.api.edit_wgnode(NODE, listenPort=51999)
    with structlog.testing.capture_logs() as logs:
        h.step()
    assert spec(h) == ours
    assert h.agent.publisher.repairs == 1
    assert h.kube_events("SpecRepaired") == [NODE]
    assert [e["type"] for e in h.api.events if e["reason"] == "SpecRepaired"] == ["Warning"]
    assert ("Warning", "SpecRepaired") in h.local_events()
    line = next(e for e in logs if e["event"] == "wireguardnode_repaired")
    assert line["log_level"] == "warning"
    assert "spec.listenPort was 51999, put back to 51871" in line["change"]
    assert repairs_metric(h) == 1.0


def test_a_key_replaced_by_someone_else_is_put_back(h: AgentHarness) -> None:
    forged = agentfakes.other_node(9).public_key
    h.api.edit_wgnode(NODE, publicKey=forged)
    h.step()
    assert spec(h)["publicKey"] == h.agent.keys.public_key
    assert h.agent.publisher.repairs == 1


def test_a_deleted_wireguardnode_is_created_again(h: AgentHarness) -> None:
    del h.api.wgnodes[NODE]
    h.wgnodes.delete(NODE)
    h.step()
    assert spec(h)["publicKey"] == h.agent.keys.public_key
    assert h.agent.publisher.repairs == 1
    assert h.kube_events("SpecRepaired") == [NODE]


def test_a_watch_that_lags_behind_the_own_write_is_no_repair(h: AgentHarness) -> None:
    # The watch still shows an older spec than the apiserver holds: read again, nothing to do.
    stale = {**h.api.wgnodes[NODE], "spec": {**spec(h), "listenPort": 51999}}
    h.wgnodes.put(stale)
    writes = len(h.api.writes)
    h.step()
    h.step()
    assert len(h.api.writes) == writes
    assert h.agent.publisher.repairs == 0
    assert h.kube_events("SpecRepaired") == []


def test_the_spec_as_published_is_left_alone(h: AgentHarness) -> None:
    writes = len(h.api.writes)
    for _ in range(3):
        h.step()
        h.advance(1)
    assert len(h.api.writes) == writes
    assert repairs_metric(h) == 0.0


# 2. A rotation that does not get through at once


def test_a_rotation_not_published_is_reported_then_published_and_said_so(
    h: AgentHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = h.agent.keys.public_key
    with monkeypatch.context() as m:
        refuse_spec_writes(h, m)
        with pytest.raises(RuntimeError, match="not published yet"):
            h.controller.rotate_key()
        new = h.agent.keys.public_key
        assert h.backend.read().public_key == new  # on the device, not in the WireguardNode
        for _ in range(3):  # retried every turn, reported meanwhile
            h.step(woke=False)
            h.advance(1)
        h.step()  # a pass: the status is written
        assert spec(h)["publicKey"] == old
        status, reason, message = h.conditions()[wgnode.KEY_PUBLISHED]
        assert (status, reason) == ("False", "PublishPending")
        assert f"the device's key {new} is not published yet" in message
        assert f"the WireguardNode still has {old}" in message
        assert "etcd timed out" in message
        code, text = metrics.readiness(h.agent)
        assert code == 503
        assert f"publisher: not ok: the device's key {new} is not published yet" in text
    h.step(woke=False)  # the apiserver takes writes again; no pass is due
    assert spec(h)["publicKey"] == new
    assert h.conditions()[wgnode.KEY_PUBLISHED][0] == "True"
    assert h.agent.publisher.repairs == 0


def test_a_rotation_the_device_refused_is_not_published_until_the_device_has_the_key(
    h: AgentHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = h.agent.keys.public_key
    with monkeypatch.context() as m:

        def refused(raw: bytes) -> None:
            raise OSError("UAPI: device busy")

        m.setattr(h.backend, "set_private_key", refused)
        with pytest.raises(Exception, match="device busy"):
            h.controller.rotate_key()
        for _ in range(3):
            h.step(woke=False)
            h.advance(1)
        # Peers must not get a key the device does not answer to.
        assert spec(h)["publicKey"] == old
        code, text = metrics.readiness(h.agent)
        assert code == 503 and "the new key is not on the device yet" in text
    h.step(woke=False)
    new = h.agent.keys.public_key
    assert h.backend.read().public_key == new
    assert spec(h)["publicKey"] == new
    assert metrics.readiness(h.agent)[0] == 200


def test_no_status_is_written_while_the_watches_are_down(
    h: AgentHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an apiserver outage the agents must not all write "not Ready" and then "Ready"
    again the moment it answers (thousands of writes into a recovering apiserver, and churn
    a user sees in every resourceVersion): while its watches are down an agent does not know
    its own object as it is, so it writes nothing; once they are back, only a real change."""
    writes: list[dict[str, Any]] = []
    real = h.api.patch_wgnode_status

    def counted(name: str, patch: dict[str, Any]) -> Any:
        writes.append(patch)
        return real(name, patch)

    monkeypatch.setattr(h.api, "patch_wgnode_status", counted)
    h.nodes.fail("connection refused")  # the watches lost the apiserver; writes get through
    h.wgnodes.fail("connection refused")
    h.advance(400)  # a resync pass comes due meanwhile
    h.step()
    assert writes == [], "a status written while the watches were down"
    h.list(agentfakes.other_node(2))  # back, with the same cluster
    h.step()
    assert writes == [], "nothing changed, yet the status was written again"
