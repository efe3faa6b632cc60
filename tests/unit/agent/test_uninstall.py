"""An uninstall request arms the agent, and only an armed agent clears the node as it stops.

The agent is assembled on fakes (`agentfakes.AgentHarness`) with a fake clock: the request is
the annotation `podwire prepare-uninstall` sets on the own WireguardNode; what a user notices is
the UninstallArmed condition, the Events, and, on stop, whether the device and routes are asked
to go.
"""

from __future__ import annotations

import copy
import pathlib

import agentfakes
import pytest

from podwire.agent import cli, controller
from podwire.api import wgnode

AgentHarness = agentfakes.AgentHarness


@pytest.fixture
def h(tmp_path: pathlib.Path) -> AgentHarness:
    harness = AgentHarness(tmp_path / "private.key")
    harness.start()
    harness.list(agentfakes.other_node(2))
    harness.step()
    return harness


def _annotate(h: AgentHarness, text: str | None) -> None:
    """Sets (or with None removes) the uninstall request, as `podwire prepare-uninstall` does."""
    own = copy.deepcopy(h.api.wgnodes[AgentHarness.NODE])
    annotations = own["metadata"].setdefault("annotations", {})
    if text is None:
        annotations.pop(wgnode.UNINSTALL_ANNOTATION, None)
    else:
        annotations[wgnode.UNINSTALL_ANNOTATION] = text
    h.api.wgnodes[AgentHarness.NODE] = own
    h.wgnodes.put(copy.deepcopy(own))


def _armed(h: AgentHarness) -> tuple[str, str, str] | None:
    return h.conditions().get(wgnode.UNINSTALL_ARMED)


def _now(h: AgentHarness, offset: float = 0.0) -> str:
    return wgnode.format_precise_time(h.clock.wall() + offset)


def test_a_node_never_asked_has_no_uninstall_condition(h: AgentHarness) -> None:
    h.advance(30)
    h.step()
    assert _armed(h) is None
    assert not h.controller.uninstall_armed


def test_a_recent_request_arms_with_condition_and_event(h: AgentHarness) -> None:
    _annotate(h, _now(h))
    h.step()
    status, reason, message = _armed(h) or ("", "", "")
    assert (status, reason) == ("True", "Armed")
    assert "key folder stays" in message
    assert h.kube_events("UninstallArmed") == [AgentHarness.NODE]
    assert h.controller.uninstall_armed
    h.step()
    assert h.kube_events("UninstallArmed") == [AgentHarness.NODE]  # once, not every turn


def test_removing_the_annotation_disarms(h: AgentHarness) -> None:
    _annotate(h, _now(h))
    h.step()
    _annotate(h, None)
    h.step()
    assert (_armed(h) or ("",))[0] == "False"
    assert h.kube_events("UninstallDisarmed") == [AgentHarness.NODE]
    assert not h.controller.uninstall_armed


def test_a_request_goes_stale_after_ten_minutes(h: AgentHarness) -> None:
    _annotate(h, _now(h))
    h.step()
    h.advance(controller.UNINSTALL_MAX_AGE - 5)
    h.step()
    assert h.controller.uninstall_armed
    h.advance(10)
    h.step()
    status, _, message = _armed(h) or ("", "", "")
    assert status == "False" and "older than 600 s" in message
    assert not h.controller.uninstall_armed


@pytest.mark.parametrize(
    ("offset", "words"),
    [(-(controller.UNINSTALL_MAX_AGE + 1), "older than"), (301.0, "in the future")],
)
def test_a_stale_or_future_request_does_not_arm(h: AgentHarness, offset: float, words: str) -> None:
    _annotate(h, _now(h, offset))
    h.step()
    status, reason, message = _armed(h) or ("", "", "")
    assert (status, reason) == ("False", "NotArmed") and words in message
    assert not h.controller.uninstall_armed
    assert h.kube_events("UninstallArmed") == []


def test_a_request_within_the_future_limit_arms(h: AgentHarness) -> None:
    _annotate(h, _now(h, 250.0))
    h.step()
    assert h.controller.uninstall_armed


def test_a_bad_time_does_not_arm_nor_crash(h: AgentHarness) -> None:
    _annotate(h, "yesterday")
    h.step()
    status, _, message = _armed(h) or ("", "", "")
    assert status == "False" and wgnode.UNINSTALL_ANNOTATION in message
    assert not h.controller.uninstall_armed


class _Removals:
    """Records what the agent asks the device and routes to remove on stop."""

    def __init__(self, h: AgentHarness) -> None:
        self.calls: list[str] = []
        h.backend.remove = lambda: self.calls.append("device")  # type: ignore[attr-defined]
        h.routes.remove_all = self._routes  # type: ignore[attr-defined]

    def _routes(self) -> list[str]:
        self.calls.append("routes")
        return []


def test_a_stop_not_armed_leaves_the_node_as_it_is(h: AgentHarness) -> None:
    removals = _Removals(h)
    h.agent.stop()
    assert removals.calls == []


def test_an_armed_stop_removes_the_device_then_the_routes(h: AgentHarness) -> None:
    removals = _Removals(h)
    _annotate(h, _now(h))
    h.step()
    h.agent.stop()
    assert removals.calls == ["device", "routes"]


def test_a_disarmed_stop_leaves_the_node(h: AgentHarness) -> None:
    removals = _Removals(h)
    _annotate(h, _now(h))
    h.step()
    _annotate(h, None)
    h.step()
    h.agent.stop()
    assert removals.calls == []


@pytest.mark.parametrize(("text", "seconds"), [("60", 60.0), ("60s", 60.0), ("2m", 120.0)])
def test_prepare_uninstall_takes_helm_style_durations(text: str, seconds: float) -> None:
    args = cli._parser(plugins=()).parse_args(["prepare-uninstall", "--timeout", text])
    assert args.timeout == seconds


@pytest.mark.parametrize("text", ["-5s", "soon", "1h"])
def test_prepare_uninstall_refuses_a_bad_timeout(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli._parser(plugins=()).parse_args(["prepare-uninstall", f"--timeout={text}"])
    assert exit_info.value.code == 2
    assert repr(text) in capsys.readouterr().err
