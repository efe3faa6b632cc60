"""Where the advisories reach a user: the WireguardNode's status (and `kubectl get wgnodes`'
column), `podwire status`, and /metrics; and when the agent reads the node's settings again.

The agent runs on the fakes of `agentfakes.AgentHarness`; what it would read from the kernel
is a `Facts` the test changes, as an operator changes the node (a reboot, ethtool).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import agentfakes
import prometheus_client
import pytest
import yaml

from podwire.agent import advisories, api, cli, metrics
from podwire.api import wgnode

AgentHarness = agentfakes.AgentHarness
NODE = AgentHarness.NODE
RESYNC = 300.0
CRD = pathlib.Path(__file__).resolve().parents[3] / "deploy/helm/podwire/crds/wireguardnodes.yaml"


class FakeNode:
    """What the node's kernel says, as link.survey would read it; counts the reads."""

    def __init__(self) -> None:
        self.facts = advisories.Facts(cmdline="quiet init_on_alloc=1", kernel_config=None)
        self.reads = 0

    def __call__(
        self,
        datapath: str,
        device: str,
        features: tuple[str, ...],
        *,
        underlay_address: str | None,
        netns: str | None,
    ) -> advisories.Facts:
        self.reads += 1
        return dataclasses.replace(self.facts, datapath=datapath, device=device, features=features)


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
def h(tmp_path: pathlib.Path, node: FakeNode) -> AgentHarness:
    harness = AgentHarness(tmp_path / "private.key", resync_period=RESYNC)
    harness.agent.datapath.surveyor = node
    harness.start()
    harness.list(agentfakes.other_node(2))
    harness.step()
    return harness


def written(h: AgentHarness) -> dict[str, Any]:
    return dict(h.api.wgnodes[NODE]["status"])


def advisory_metric(h: AgentHarness, name: str) -> float | None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.AgentCollector(h.agent))
    return registry.get_sample_value("podwire_advisory", {"name": name})


def test_the_wireguardnode_status_lists_each_advisory_and_counts_them(h: AgentHarness) -> None:
    status = written(h)
    assert [a["name"] for a in status["advisories"]] == ["init_on_alloc"]
    assert "init_on_alloc=0" in status["advisories"][0]["message"]
    assert status["advisoryCount"] == 1


def test_a_node_without_advice_writes_an_empty_list_and_zero(
    tmp_path: pathlib.Path, node: FakeNode
) -> None:
    node.facts = advisories.Facts(cmdline="quiet init_on_alloc=0")
    harness = AgentHarness(tmp_path / "private.key")
    harness.agent.datapath.surveyor = node
    harness.start()
    harness.list()
    harness.step()
    status = written(harness)
    assert (status["advisories"], status["advisoryCount"]) == ([], 0)


def test_the_node_is_read_when_the_device_comes_up_and_at_each_resync_not_every_pass(
    h: AgentHarness, node: FakeNode
) -> None:
    assert node.reads == 1, "read once, when the device came up"
    node.facts = advisories.Facts(cmdline="quiet init_on_alloc=0")  # rebooted, say
    for _ in range(5):
        h.advance(10)
        h.step(woke=True)
    assert node.reads == 1
    assert written(h)["advisoryCount"] == 1, "not read again before the resync"
    h.advance(RESYNC)
    h.step(woke=False)
    assert node.reads == 2
    assert (written(h)["advisories"], written(h)["advisoryCount"]) == ([], 0)


def test_an_advisory_that_appears_at_the_resync_is_written(h: AgentHarness, node: FakeNode) -> None:
    node.facts = dataclasses.replace(node.facts, underlay_device="eth0", udp_gro_forwarding=False)
    h.advance(RESYNC)
    h.step(woke=False)
    assert [a["name"] for a in written(h)["advisories"]] == ["init_on_alloc", "udp_gro_forwarding"]
    assert written(h)["advisoryCount"] == 2


def test_the_local_api_reports_the_advisories(h: AgentHarness) -> None:
    status = api.Servicer(h.agent).GetStatus(None, None)
    assert [(a.name, "init_on_alloc=0" in a.message) for a in status.advisories] == [
        ("init_on_alloc", True)
    ]


@pytest.fixture
def served(h: AgentHarness) -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="pw") as folder:  # a unix socket's path is short
        server = api.ApiServer(h.agent, pathlib.Path(folder) / "api" / "agent.sock")
        server.start()
        try:
            yield server.socket_path
        finally:
            server.stop()


def test_podwire_status_prints_each_advisory_with_what_to_do(
    served: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--socket", str(served)]) == 0
    out = capsys.readouterr().out
    assert "advisories:  1" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("init_on_alloc:"))
    assert "boot with init_on_alloc=0" in line


def test_podwire_status_says_none_when_there_is_no_advice(
    h: AgentHarness, node: FakeNode, served: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node.facts = advisories.Facts(cmdline="init_on_alloc=0")
    h.agent.datapath.survey()
    assert cli.main(["status", "--socket", str(served)]) == 0
    assert "advisories:  -" in capsys.readouterr().out


def test_each_advisory_is_a_metric_while_it_holds(h: AgentHarness, node: FakeNode) -> None:
    assert advisory_metric(h, "init_on_alloc") == 1
    assert advisory_metric(h, "udp_gro_forwarding") is None
    node.facts = advisories.Facts(
        cmdline="init_on_alloc=0", underlay_device="eth0", udp_gro_forwarding=False
    )
    h.agent.datapath.survey()
    assert advisory_metric(h, "init_on_alloc") is None
    assert advisory_metric(h, "udp_gro_forwarding") == 1


def test_the_datapath_health_line_names_the_advisories(h: AgentHarness) -> None:
    health = dict(h.agent.health())["datapath"]
    assert health.ok, "advice costs speed, not readiness"
    assert "advisories: init_on_alloc" in health.message


# The status model and the CRD


ADVICE = (
    wgnode.Advisory("init_on_alloc", "boot with init_on_alloc=0"),
    wgnode.Advisory("threaded_napi", "turn threaded_napi on"),
)


def test_status_round_trips_its_advisories() -> None:
    status = wgnode.Status(datapath="kernel", advisories=ADVICE)
    body = status.to_dict()
    assert body["advisories"] == [
        {"name": "init_on_alloc", "message": "boot with init_on_alloc=0"},
        {"name": "threaded_napi", "message": "turn threaded_napi on"},
    ]
    assert body["advisoryCount"] == 2
    assert wgnode.Status.from_dict(body) == status


@pytest.mark.parametrize(
    ("advice", "count", "field"),
    [
        ("init_on_alloc", None, "status.advisories"),  # not a list
        (["init_on_alloc"], None, "status.advisories[]"),  # not objects
        ([{"message": "x"}], None, "status.advisories[].name"),
        ([{"name": "", "message": "x"}], None, "status.advisories"),
        ([{"name": "a", "message": 3}], None, "status.advisories[].message"),
        ([{"name": "a", "message": "x"}], 2, "status.advisoryCount"),
        ([], "0", "status.advisoryCount"),
    ],
)
def test_status_refuses_malformed_advisories(advice: object, count: object, field: str) -> None:
    body: dict[str, Any] = {"advisories": advice}
    if count is not None:
        body["advisoryCount"] = count
    with pytest.raises(wgnode.ResourceError) as caught:
        wgnode.Status.from_dict(body, name=NODE)
    assert caught.value.field == field


def _status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    return dict(version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"])


def test_the_crd_takes_every_advisory_the_agent_can_write() -> None:
    schema = _status_schema()
    every = advisories.find(
        advisories.Facts(
            datapath="kernel",
            device="podwire_wg0",
            cmdline="init_on_alloc=1",
            underlay_device="a-long-underlay0",
            udp_gro_forwarding=False,
            sizes={"gso_max_size": 65536, "gro_max_size": 65536, "tso_max_size": 65536},
            threaded_napi=False,
        )
    )
    assert [a.name for a in every] == list(advisories.NAMES)
    body = wgnode.Status(
        advisories=tuple(wgnode.Advisory(a.name, a.message) for a in every)
    ).to_dict()
    items = schema["advisories"]["items"]
    assert len(body["advisories"]) <= schema["advisories"]["maxItems"]
    for item in body["advisories"]:
        assert set(items["required"]) <= set(item) <= set(items["properties"])
        for key, value in item.items():
            assert isinstance(value, str)
            assert len(value) <= items["properties"][key]["maxLength"], (key, value)
    # A list-map keyed by name: the apiserver refuses two entries with one name.
    assert schema["advisories"]["x-kubernetes-list-map-keys"] == ["name"]
    assert len({a["name"] for a in body["advisories"]}) == len(body["advisories"])
    count = schema["advisoryCount"]
    assert count["type"] == "integer" and body["advisoryCount"] >= count["minimum"]
