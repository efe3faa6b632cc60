"""The WireguardNode model: a malformed resource is a ResourceError, never a crash."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from podwire.api import wgnode

WgNodeFactory = Callable[..., dict[str, Any]]


def test_constants_match_the_architecture() -> None:
    assert (wgnode.GROUP, wgnode.VERSION, wgnode.KIND) == (
        "podwire.io",
        "v1alpha1",
        "WireguardNode",
    )
    assert (wgnode.PLURAL, wgnode.SHORT) == ("wgnodes", "wgnode")
    assert wgnode.ROTATE_ANNOTATION == "podwire.io/rotate-key-requested-at"


def test_round_trip_of_a_full_resource(
    make_wgnode: WgNodeFactory, new_public_key: Callable[[], str]
) -> None:
    status = {
        "endpoint": "10.0.0.2:51871",
        "podCIDRs": ["10.244.2.0/24", "fd00:10:244:2::/64"],
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "PeersProgrammed",
                "message": "2 peers",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "datapath": "kernel",
        "features": ["gro", "big_tcp"],
        "peers": 2,
        "keyRotatedAt": "2026-01-01T00:00:00Z",
        "observedGeneration": 3,
        "advisories": [{"name": "init_on_alloc", "message": "boot with init_on_alloc=0"}],
        "advisoryCount": 1,
    }
    raw = make_wgnode("node-b", new_public_key(), status=status)
    raw["metadata"]["annotations"] = {wgnode.ROTATE_ANNOTATION: "2026-01-02T00:00:00Z"}
    raw["metadata"]["generation"] = 3
    raw["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Node", "name": "node-b", "uid": "u-b"}
    ]
    node = wgnode.WireguardNode.from_dict(raw)
    assert node.name == "node-b"
    assert node.spec.listen_port == 51871
    assert node.status is not None and node.status.datapath == "kernel"
    assert node.status.conditions[0].observed_generation == 3
    assert node.rotate_requested_at == "2026-01-02T00:00:00Z"
    assert node.owner == wgnode.OwnerNode("node-b", "u-b")
    assert node.generation == 3 and node.resource_version == "7"
    body = node.to_dict()
    assert body["spec"] == raw["spec"]
    assert body["status"] == status
    assert body["metadata"]["resourceVersion"] == "7"
    assert wgnode.WireguardNode.from_dict(body).to_dict() == body


def test_new_resource_body_owned_by_its_node(new_public_key: Callable[[], str]) -> None:
    key = new_public_key()
    body = wgnode.new("node-a", "uid-1", key, listen_port=51999).to_dict()
    assert body == {
        "apiVersion": "podwire.io/v1alpha1",
        "kind": "WireguardNode",
        "metadata": {
            "name": "node-a",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": "node-a",
                    "uid": "uid-1",
                    "blockOwnerDeletion": False,
                    "controller": False,
                }
            ],
        },
        "spec": {"publicKey": key, "listenPort": 51999},
    }


def test_status_body_leaves_unset_fields_out(new_public_key: Callable[[], str]) -> None:
    node = wgnode.WireguardNode(
        name="node-a",
        spec=wgnode.Spec(new_public_key()),
        status=wgnode.Status(datapath="userspace", peers=0),
    )
    body = node.status_body()
    assert body["metadata"] == {"name": "node-a"}
    assert body["status"] == {
        "podCIDRs": [],
        "conditions": [],
        "datapath": "userspace",
        "features": [],
        "peers": 0,
        # Always written: an empty list must replace the last one in a merge patch.
        "advisories": [],
        "advisoryCount": 0,
    }


BAD_SPECS: list[tuple[Any, str]] = [
    (None, "spec must be an object"),
    ([], "spec must be an object"),
    ({"listenPort": 51871}, "spec.publicKey must be a string"),
    ({"publicKey": 7, "listenPort": 51871}, "spec.publicKey must be a string"),
    ({"publicKey": "", "listenPort": 51871}, "exactly 32 bytes"),
    ({"publicKey": "B" * 43 + "=", "listenPort": 51871}, "exactly 32 bytes"),  # non-canonical
    ({"publicKey": "-" * 43 + "=", "listenPort": 51871}, "exactly 32 bytes"),
    ({"publicKey": "KEY", "listenPort": 0}, "exactly 32 bytes"),
    ({"publicKey": "GOOD"}, "spec.listenPort must be an integer"),
    ({"publicKey": "GOOD", "listenPort": "51871"}, "spec.listenPort must be an integer"),
    ({"publicKey": "GOOD", "listenPort": True}, "spec.listenPort must be an integer"),
    ({"publicKey": "GOOD", "listenPort": 0}, "1..65535"),
    ({"publicKey": "GOOD", "listenPort": 65536}, "1..65535"),
    ({"publicKey": "GOOD", "listenPort": -1}, "1..65535"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_spec_is_a_resource_error(
    spec: Any, message: str, new_public_key: Callable[[], str]
) -> None:
    if isinstance(spec, dict) and spec.get("publicKey") == "GOOD":
        spec = {**spec, "publicKey": new_public_key()}
    raw = {"metadata": {"name": "node-x"}, "spec": spec}
    with pytest.raises(wgnode.ResourceError, match=message) as err:
        wgnode.WireguardNode.from_dict(raw)
    assert err.value.name == "node-x"
    assert "'node-x'" in str(err.value)


@pytest.mark.parametrize("size", [31, 33])
def test_key_of_the_wrong_size_is_refused(size: int, b64_of_len: Callable[[int], str]) -> None:
    with pytest.raises(wgnode.ResourceError) as err:
        wgnode.validate_public_key(b64_of_len(size))
    assert err.value.field == "spec.publicKey"


GARBAGE: list[Any] = [
    None,
    "text",
    [],
    {},
    {"metadata": None},
    {"metadata": {"name": ""}},
    {"metadata": {"name": 5}},
    {"metadata": {"name": "n", "annotations": {"a": 1}}, "spec": {}},
    {"kind": "Node", "metadata": {"name": "n"}},
]


@pytest.mark.parametrize("raw", GARBAGE)
def test_garbage_never_raises_anything_but_resource_error(raw: Any) -> None:
    with pytest.raises(wgnode.ResourceError):
        wgnode.WireguardNode.from_dict(raw)


COND = {
    "type": "Ready",
    "status": "True",
    "reason": "R",
    "lastTransitionTime": "2026-01-01T00:00:00Z",
}
BAD_STATUSES: list[tuple[Any, str]] = [
    ("up", "status must be an object"),
    ({"datapath": "ebpf"}, "status.datapath must be one of kernel, userspace"),
    ({"peers": -1}, "status.peers must not be negative"),
    ({"peers": "2"}, "status.peers must be an integer"),
    ({"podCIDRs": "10.0.0.0/8"}, "status.podCIDRs must be a list"),
    ({"features": [1]}, r"status.features\[\] must be a string"),
    ({"conditions": [{**COND, "status": "Yes"}]}, "status must be one"),
    ({"conditions": [{**COND, "reason": "no spaces"}]}, "CamelCase"),
    (
        {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "x"}]},
        "reason must be a string",
    ),
    ({"conditions": [{**COND, "lastTransitionTime": ""}]}, "lastTransitionTime is required"),
    (
        {"conditions": [{"type": "Ready", "status": "True", "reason": "R"}]},
        "lastTransitionTime must be a string",
    ),
    ({"conditions": ["Ready"]}, "must be an object"),
]


@pytest.mark.parametrize(("status", "message"), BAD_STATUSES)
def test_bad_status_is_a_resource_error_naming_the_resource(
    status: Any, message: str, make_wgnode: WgNodeFactory, new_public_key: Callable[[], str]
) -> None:
    raw = make_wgnode("node-s", new_public_key(), status=status)
    with pytest.raises(wgnode.ResourceError, match=message) as err:
        wgnode.WireguardNode.from_dict(raw)
    assert err.value.name == "node-s"


def test_unknown_fields_are_ignored(
    make_wgnode: WgNodeFactory, new_public_key: Callable[[], str]
) -> None:
    # A newer agent may write more; an older one must still read the rest.
    raw = make_wgnode("node-n", new_public_key(), status={"futureField": {"x": 1}})
    raw["spec"]["futureSpec"] = True
    assert wgnode.WireguardNode.from_dict(raw).status == wgnode.Status()


def test_set_condition_keeps_transition_time_while_status_holds() -> None:
    conds = wgnode.set_condition((), wgnode.READY, "False", "Starting", now="2026-01-01T00:00:00Z")
    conds = wgnode.set_condition(
        conds, wgnode.KEY_PUBLISHED, "True", "Published", now="2026-01-01T00:00:01Z"
    )
    conds = wgnode.set_condition(
        conds, wgnode.READY, "False", "Syncing", message="watches", now="2026-01-01T00:00:05Z"
    )
    ready = wgnode.find_condition(conds, wgnode.READY)
    assert ready is not None
    assert ready.last_transition_time == "2026-01-01T00:00:00Z"
    assert (ready.reason, ready.message) == ("Syncing", "watches")
    assert [c.type for c in conds] == [wgnode.READY, wgnode.KEY_PUBLISHED]

    conds = wgnode.set_condition(
        conds, wgnode.READY, "True", "PeersProgrammed", now="2026-01-01T00:00:09Z"
    )
    ready = wgnode.find_condition(conds, wgnode.READY)
    assert ready is not None and ready.last_transition_time == "2026-01-01T00:00:09Z"
    assert ready.status == "True"


def test_set_condition_refuses_bad_values() -> None:
    with pytest.raises(wgnode.ResourceError):
        wgnode.set_condition((), wgnode.READY, "Maybe", "R", now="x")  # type: ignore[arg-type]
    with pytest.raises(wgnode.ResourceError):
        wgnode.set_condition((), wgnode.READY, "True", "not a reason", now="x")


def test_format_time_is_rfc3339_utc() -> None:
    assert wgnode.format_time(1_767_225_600.9) == "2026-01-01T00:00:00Z"


def test_spec_constructor_validates(new_public_key: Callable[[], str]) -> None:
    with pytest.raises(wgnode.ResourceError):
        wgnode.Spec("short", 51871)
    with pytest.raises(wgnode.ResourceError):
        wgnode.Spec(new_public_key(), 0)
