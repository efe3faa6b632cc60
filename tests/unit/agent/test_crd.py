"""The WireguardNode CRD, read as data: names, schema and printer columns.

The schema's key pattern must agree with the agent's own check (podwire.api.wgnode), so both
are run against the same keys here. The real kube-apiserver test is in tests/integration.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import pytest

from podwire.api import wgnode


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    assert isinstance(version, dict)
    return version


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema = _version(crd)["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def _key_pattern(crd: dict[str, Any]) -> re.Pattern[str]:
    # OpenAPI patterns are ECMA regexes; this one uses nothing Python reads differently.
    return re.compile(_schema(crd)["properties"]["spec"]["properties"]["publicKey"]["pattern"])


def test_names_and_scope(crd: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{wgnode.PLURAL}.{wgnode.GROUP}"
    spec = crd["spec"]
    assert spec["group"] == wgnode.GROUP
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == wgnode.KIND
    assert spec["names"]["plural"] == wgnode.PLURAL
    assert spec["names"]["singular"] == wgnode.SINGULAR
    assert spec["names"]["shortNames"] == [wgnode.SHORT]
    version = _version(crd)
    assert version["name"] == wgnode.VERSION
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_key_pattern_accepts_real_keys(
    crd: dict[str, Any], new_public_key: Callable[[], str]
) -> None:
    pattern = _key_pattern(crd)
    for _ in range(200):
        key = new_public_key()
        assert pattern.fullmatch(key), key
        assert wgnode.validate_public_key(key) == key


@pytest.mark.parametrize("size", [31, 33, 0, 64])
def test_key_pattern_refuses_other_sizes(
    crd: dict[str, Any], size: int, b64_of_len: Callable[[int], str]
) -> None:
    text = b64_of_len(size)
    assert not _key_pattern(crd).fullmatch(text)
    with pytest.raises(wgnode.ResourceError):
        wgnode.validate_public_key(text)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k.replace("=", ""),  # no padding
        lambda k: "-" + k[1:],  # URL-safe alphabet
        lambda k: "_" + k[1:],
        lambda k: "." + k[1:],
        lambda k: k[:42] + "B=",  # unused low bits set: not the canonical spelling
        lambda k: k + "\n",
        lambda k: " " + k[1:],
    ],
)
def test_key_pattern_refuses_a_wrong_alphabet_or_spelling(
    crd: dict[str, Any], new_public_key: Callable[[], str], mangle: Callable[[str], str]
) -> None:
    text = mangle(new_public_key())
    assert not _key_pattern(crd).fullmatch(text)
    with pytest.raises(wgnode.ResourceError):
        wgnode.validate_public_key(text)


def test_every_canonical_last_character_is_allowed(crd: dict[str, Any]) -> None:
    # The 43rd character carries 4 bits of the last byte: 16 possible values.
    pattern = _key_pattern(crd)
    seen = set()
    for last in range(256):
        key = base64.b64encode(bytes(31) + bytes([last])).decode()
        assert pattern.fullmatch(key)
        seen.add(key[42])
    assert len(seen) == 16


def test_lanes_are_schemad_like_lane_zero(crd: dict[str, Any]) -> None:
    spec = _schema(crd)["properties"]["spec"]["properties"]
    lane = spec["lanes"]["items"]
    assert set(lane["required"]) == {"publicKey", "listenPort"}
    assert lane["properties"]["publicKey"]["pattern"] == spec["publicKey"]["pattern"]
    assert spec["lanes"]["maxItems"] == wgnode.MAX_LANES - 1
    status = _schema(crd)["properties"]["status"]["properties"]["lanes"]
    assert (status["minimum"], status["maximum"]) == (1, wgnode.MAX_LANES)


def test_port_range(crd: dict[str, Any]) -> None:
    port = _schema(crd)["properties"]["spec"]["properties"]["listenPort"]
    assert port["type"] == "integer"
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    assert set(_schema(crd)["properties"]["spec"]["required"]) == {"publicKey", "listenPort"}


def test_status_is_schemad_with_standard_conditions(crd: dict[str, Any]) -> None:
    status = _schema(crd)["properties"]["status"]["properties"]
    assert set(status) == {
        "endpoint",
        "podCIDRs",
        "conditions",
        "datapath",
        "features",
        "peers",
        "keyRotatedAt",
        "peersOnCurrentKey",
        "observedGeneration",
        "advisories",
        "advisoryCount",
        "lanes",
    }
    assert status["datapath"]["enum"] == list(wgnode.DATAPATHS)
    cond = status["conditions"]["items"]
    assert set(cond["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert cond["properties"]["status"]["enum"] == list(wgnode.CONDITION_STATUSES)
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    # The reason pattern is the one the model enforces, so the apiserver never refuses ours.
    reason = re.compile(cond["properties"]["reason"]["pattern"])
    assert reason.fullmatch("DuplicatePublicKey") and not reason.fullmatch("bad reason")


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {
        c["name"]: (c["jsonPath"], c["type"]) for c in _version(crd)["additionalPrinterColumns"]
    }
    assert columns == {
        "Public Key": (".spec.publicKey", "string"),
        "Endpoint": (".status.endpoint", "string"),
        "Pod CIDRs": (".status.podCIDRs", "string"),
        "Datapath": (".status.datapath", "string"),
        "Peers": (".status.peers", "integer"),
        "Lanes": (".status.lanes", "integer"),
        "Ready": ('.status.conditions[?(@.type=="Ready")].status', "string"),
        "Advisories": (".status.advisoryCount", "integer"),
        "Key Age": (".status.keyRotatedAt", "date"),
        "Age": (".metadata.creationTimestamp", "date"),
    }


def test_status_written_by_the_model_fits_the_schema(crd: dict[str, Any]) -> None:
    # A light check (types and enums) that every status field the model writes is schema'd.
    status = wgnode.Status(
        endpoint="10.0.0.1:51871",
        pod_cidrs=("10.244.0.0/24",),
        conditions=wgnode.set_condition((), wgnode.READY, "True", "Ok", now="2026-01-01T00:00:00Z"),
        datapath="kernel",
        features=("gro",),
        peers=1,
        key_rotated_at="2026-01-01T00:00:00Z",
        observed_generation=1,
    ).to_dict()
    props = _schema(crd)["properties"]["status"]["properties"]
    assert set(status) <= set(props)
    types = {"string": str, "integer": int, "array": list}
    for name, value in status.items():
        assert isinstance(value, types[props[name]["type"]]), name
