"""The WireguardNode resource model: the one contract between agents, operator, CLI and CRD.

Every node's agent publishes its public key here and reads everybody else's, so a resource
written by another node (maybe a different podwire version, maybe edited by hand) is input
to distrust: `WireguardNode.from_dict` checks every field it reads and raises `ResourceError`,
never anything else, so a malformed resource costs one peer and never the agent.

Pure on purpose: plain dicts in the camelCase JSON form that the apiserver sends (what the
kubernetes client's dynamic and custom-objects APIs return), no kubernetes import, no clock
(times are passed in), so the operator and the CLI can use it as well as the agent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

GROUP: Final = "podwire.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "WireguardNode"
PLURAL: Final = "wgnodes"
SINGULAR: Final = "wireguardnode"
SHORT: Final = "wgnode"

# Set to an RFC 3339 time (fractions of a second allowed) by the CLI, kubectl or the operator
# to ask the node's agent for a new key: the agent rotates when it is newer than its key, once
# per value, and answers with status.keyRotatedAt and, as peers handshake with the new key,
# status.peersOnCurrentKey.
ROTATE_ANNOTATION: Final = "podwire.io/rotate-key-requested-at"
# Set by `podwire rotate-key --all` on every WireguardNode: the operator rotates the queued
# nodes one at a time and removes the annotation from each when it is done with it.
ROTATION_QUEUED_ANNOTATION: Final = "podwire.io/rotation-queued-at"
# Set to an RFC 3339 time by `podwire prepare-uninstall` (the chart's pre-delete hook) on every
# WireguardNode: while it is recent, the node's agent is armed (condition UninstallArmed) and,
# when it is next told to stop, removes its devices, routes, backstops and rules from the node
# instead of leaving them for the next agent. The key folder stays.
UNINSTALL_ANNOTATION: Final = "podwire.io/uninstall-requested-at"

DEFAULT_LISTEN_PORT: Final = 51871
MAX_LANES: Final = 8  # WireGuard devices per node (lane i listens on listenPort + i)

# Condition types, as they appear in status.conditions:
# - KeyPublished: spec holds the key the node's device uses.
# - PeersProgrammed: the device holds every peer and route that synced watches ask for.
# - PeersRefused: some nodes are not programmed (a duplicate key, an overlapping pod CIDR, ...);
#   the message names them, an Event on each says why.
# - Encrypted: no pod traffic to the cluster's pod CIDRs leaves this node in clear: the device
#   is up and the fail-closed backstop drops what has no peer. A route of another program that
#   would take remote pod traffic past the device makes it False (reason CompetingRoute), or,
#   with strictMode, which keeps that traffic in the tunnel, leaves it True with the reason
#   CompetingRouteOverridden; either names the route (there is an Event and a metric too).
# - Ready: KeyPublished and PeersProgrammed.
READY: Final = "Ready"
KEY_PUBLISHED: Final = "KeyPublished"
PEERS_PROGRAMMED: Final = "PeersProgrammed"
PEERS_REFUSED: Final = "PeersRefused"
ENCRYPTED: Final = "Encrypted"
CONDITION_TYPES: Final = (READY, KEY_PUBLISHED, PEERS_PROGRAMMED, PEERS_REFUSED, ENCRYPTED)
# - UninstallArmed: written once an uninstall was requested (UNINSTALL_ANNOTATION): True while
#   the agent will clean the node when it stops; False once the request is gone or stale. Not
#   in CONDITION_TYPES: a node never asked to uninstall does not carry it.
UNINSTALL_ARMED: Final = "UninstallArmed"

ConditionStatus: TypeAlias = Literal["True", "False", "Unknown"]
CONDITION_STATUSES: Final = ("True", "False", "Unknown")

Datapath: TypeAlias = Literal["kernel", "userspace"]
DATAPATHS: Final = ("kernel", "userspace")

KEY_LEN: Final = 32
# The CRD's pattern says the same: 43 base64 characters whose last one carries only 4 bits
# (so there is exactly one spelling of each key), then the padding.
_KEY_RE: Final = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
# metav1.Condition's own limits, so what we write is never refused by the apiserver.
_REASON_RE: Final = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_MAX_MESSAGE: Final = 32768
_MAX_REASON: Final = 1024


class ResourceError(ValueError):
    """A WireguardNode (or part of one) that does not follow the schema.

    `name` is the resource's name when known and `field` the JSON path of the bad field, so
    callers can report it (an Event, a condition) without parsing the message.
    """

    def __init__(self, message: str, *, name: str | None = None, field: str | None = None):
        prefix = f"WireguardNode {name!r}: " if name else "WireguardNode: "
        super().__init__(prefix + message)
        self.name = name
        self.field = field


def validate_public_key(
    value: object, *, name: str | None = None, field: str = "spec.publicKey"
) -> str:
    """Return `value` if it is the canonical base64 of a 32-byte key, else raise ResourceError."""
    if not isinstance(value, str):
        raise ResourceError(
            f"{field} must be a string, got {_type_name(value)}", name=name, field=field
        )
    if not _KEY_RE.fullmatch(value):
        raise ResourceError(
            f"{field} must be the base64 of exactly {KEY_LEN} bytes (44 characters ending in"
            f" '=', as `wg pubkey` prints it); got {len(value)} characters",
            name=name,
            field=field,
        )
    return value


def validate_listen_port(
    value: object, *, name: str | None = None, field: str = "spec.listenPort"
) -> int:
    # bool is an int in Python but `true` is not a port.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResourceError(
            f"{field} must be an integer, got {_type_name(value)}", name=name, field=field
        )
    if not 1 <= value <= 65535:
        raise ResourceError(f"{field} must be in 1..65535, got {value}", name=name, field=field)
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Lane:
    """One of a node's extra WireGuard devices (lanes 1..N-1): its own key and port."""

    public_key: str
    listen_port: int

    def __post_init__(self) -> None:
        validate_public_key(self.public_key)
        validate_listen_port(self.listen_port)

    @classmethod
    def from_dict(cls, data: object, *, name: str | None = None) -> Lane:
        obj = _mapping(data, "spec.lanes[]", name=name)
        return cls(
            public_key=validate_public_key(
                obj.get("publicKey"), name=name, field="spec.lanes[].publicKey"
            ),
            listen_port=validate_listen_port(
                obj.get("listenPort"), name=name, field="spec.lanes[].listenPort"
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"publicKey": self.public_key, "listenPort": self.listen_port}


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    """What a node's agent says about itself: the only part peers act on.

    `public_key` and `listen_port` are lane 0's (a node with one lane has only those, and an
    agent that knows nothing of lanes reads them alone); `lanes` holds lanes 1..N-1, in order.
    """

    public_key: str
    listen_port: int = DEFAULT_LISTEN_PORT
    lanes: tuple[Lane, ...] = ()

    def __post_init__(self) -> None:
        validate_public_key(self.public_key)
        validate_listen_port(self.listen_port)
        if len(self.lanes) > MAX_LANES - 1:
            raise ResourceError(
                f"spec.lanes holds at most {MAX_LANES - 1} lanes (lane 0 is spec.publicKey),"
                f" got {len(self.lanes)}",
                field="spec.lanes",
            )
        keys = [self.public_key, *(lane.public_key for lane in self.lanes)]
        if len(set(keys)) != len(keys):
            raise ResourceError("every lane needs a key of its own", field="spec.lanes")

    @classmethod
    def from_dict(cls, data: object, *, name: str | None = None) -> Spec:
        obj = _mapping(data, "spec", name=name)
        lanes = _list(obj.get("lanes", []), "spec.lanes", name=name)
        with _naming(name):
            return cls(
                public_key=validate_public_key(obj.get("publicKey"), name=name),
                listen_port=validate_listen_port(obj.get("listenPort"), name=name),
                lanes=tuple(Lane.from_dict(lane, name=name) for lane in lanes),
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"publicKey": self.public_key, "listenPort": self.listen_port}
        if self.lanes:  # a node with one lane writes what podwire always wrote
            out["lanes"] = [lane.to_dict() for lane in self.lanes]
        return out

    @property
    def lane_count(self) -> int:
        return 1 + len(self.lanes)


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """One entry of status.conditions, in the shape of the standard metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str
    last_transition_time: str  # RFC 3339; see format_time()
    message: str = ""
    observed_generation: int | None = None

    def __post_init__(self) -> None:
        if not self.type:
            raise ResourceError("a condition needs a type", field="status.conditions")
        if self.status not in CONDITION_STATUSES:
            raise ResourceError(
                f"condition {self.type}: status must be one of {', '.join(CONDITION_STATUSES)},"
                f" got {self.status!r}",
                field="status.conditions",
            )
        if not self.last_transition_time:
            raise ResourceError(
                f"condition {self.type}: lastTransitionTime is required",
                field="status.conditions",
            )
        if len(self.reason) > _MAX_REASON or not _REASON_RE.fullmatch(self.reason):
            raise ResourceError(
                f"condition {self.type}: reason must be a CamelCase word"
                f" (letters, digits, _ , :), got {self.reason!r}",
                field="status.conditions",
            )

    @classmethod
    def from_dict(cls, data: object, *, name: str | None = None) -> Condition:
        obj = _mapping(data, "status.conditions[]", name=name)
        with _naming(name):
            return cls(
                type=_str(obj.get("type"), "status.conditions[].type", name=name),
                status=obj.get("status"),  # type: ignore[arg-type]  # checked in __post_init__
                reason=_str(obj.get("reason"), "status.conditions[].reason", name=name),
                message=_str(obj.get("message", ""), "status.conditions[].message", name=name),
                last_transition_time=_str(
                    obj.get("lastTransitionTime"),
                    "status.conditions[].lastTransitionTime",
                    name=name,
                ),
                observed_generation=_optional_int(
                    obj.get("observedGeneration"),
                    "status.conditions[].observedGeneration",
                    name=name,
                ),
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message[:_MAX_MESSAGE],
            "lastTransitionTime": self.last_transition_time,
        }
        if self.observed_generation is not None:
            out["observedGeneration"] = self.observed_generation
        return out


def set_condition(
    conditions: Sequence[Condition],
    type: str,
    status: ConditionStatus,
    reason: str,
    *,
    message: str = "",
    now: str,
    observed_generation: int | None = None,
) -> tuple[Condition, ...]:
    """Return `conditions` with the one of `type` set; call it on every status update.

    lastTransitionTime moves to `now` only when the status changes (True/False/Unknown), as the
    API conventions ask, so a reconcile loop that re-asserts a condition does not make it look
    new. Reason and message always take the new values. Order is kept; a new type is appended.
    """
    new = Condition(
        type=type,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=observed_generation,
    )
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type:
            out.append(cond)
            continue
        found = True
        if cond.status == status and cond.last_transition_time:
            new = dataclasses.replace(new, last_transition_time=cond.last_transition_time)
        out.append(new)
    if not found:
        out.append(new)
    return tuple(out)


def find_condition(conditions: Iterable[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)


def parse_time(text: str) -> float:
    """Unix time from RFC 3339 (`Z` or an offset, fractions allowed); ValueError if it is not."""
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (RFC 3339 wants Z or an offset)")
    return moment.timestamp()


def format_precise_time(epoch_seconds: float) -> str:
    """RFC 3339 in UTC with microseconds: for annotations compared with a key's age."""
    moment = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(epoch_seconds: float) -> str:
    """RFC 3339 in UTC with second precision: the form metav1.Time serializes to."""
    moment = datetime.datetime.fromtimestamp(int(epoch_seconds), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True, slots=True)
class Advisory:
    """One entry of status.advisories: a kernel setting on the node that costs WireGuard
    throughput (`name`), and what to change and why (`message`)."""

    name: str
    message: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ResourceError("an advisory needs a name", field="status.advisories")

    @classmethod
    def from_dict(cls, data: object, *, name: str | None = None) -> Advisory:
        obj = _mapping(data, "status.advisories[]", name=name)
        return cls(
            name=_str(obj.get("name"), "status.advisories[].name", name=name),
            message=_str(obj.get("message", ""), "status.advisories[].message", name=name),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "message": self.message}


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    """What a node's agent reports about itself, for people and for the operator."""

    endpoint: str | None = None
    pod_cidrs: tuple[str, ...] = ()
    conditions: tuple[Condition, ...] = ()
    datapath: Datapath | None = None
    features: tuple[str, ...] = ()
    peers: int | None = None
    key_rotated_at: str | None = None
    observed_generation: int | None = None
    peers_on_current_key: int | None = None  # peers that have handshaken with the current key
    # The node's settings that cost WireGuard throughput; written with `advisoryCount`, their
    # number, because a printer column's JSONPath cannot count a list.
    advisories: tuple[Advisory, ...] = ()
    lanes: int | None = None  # the node's WireGuard devices (spec.lanes and lane 0)

    def __post_init__(self) -> None:
        if self.datapath is not None and self.datapath not in DATAPATHS:
            raise ResourceError(
                f"status.datapath must be one of {', '.join(DATAPATHS)}, got {self.datapath!r}",
                field="status.datapath",
            )
        if self.peers is not None and self.peers < 0:
            raise ResourceError("status.peers must not be negative", field="status.peers")

    @classmethod
    def from_dict(cls, data: object, *, name: str | None = None) -> Status:
        obj = _mapping(data, "status", name=name)
        conditions = _list(obj.get("conditions", []), "status.conditions", name=name)
        with _naming(name):
            return cls(
                endpoint=_optional_str(obj.get("endpoint"), "status.endpoint", name=name),
                pod_cidrs=_str_tuple(obj.get("podCIDRs", []), "status.podCIDRs", name=name),
                conditions=tuple(Condition.from_dict(c, name=name) for c in conditions),
                datapath=obj.get("datapath"),
                features=_str_tuple(obj.get("features", []), "status.features", name=name),
                peers=_optional_int(obj.get("peers"), "status.peers", name=name),
                key_rotated_at=_optional_str(
                    obj.get("keyRotatedAt"), "status.keyRotatedAt", name=name
                ),
                observed_generation=_optional_int(
                    obj.get("observedGeneration"), "status.observedGeneration", name=name
                ),
                peers_on_current_key=_optional_int(
                    obj.get("peersOnCurrentKey"), "status.peersOnCurrentKey", name=name
                ),
                advisories=_advisories(obj, name=name),
                lanes=_optional_int(obj.get("lanes"), "status.lanes", name=name),
            )

    def to_dict(self) -> dict[str, Any]:
        """The status body; fields never set are left out so a merge patch does not erase them."""
        out: dict[str, Any] = {}
        if self.endpoint is not None:
            out["endpoint"] = self.endpoint
        out["podCIDRs"] = list(self.pod_cidrs)
        out["conditions"] = [c.to_dict() for c in self.conditions]
        if self.datapath is not None:
            out["datapath"] = self.datapath
        out["features"] = list(self.features)
        if self.peers is not None:
            out["peers"] = self.peers
        if self.key_rotated_at is not None:
            out["keyRotatedAt"] = self.key_rotated_at
        if self.observed_generation is not None:
            out["observedGeneration"] = self.observed_generation
        if self.peers_on_current_key is not None:
            out["peersOnCurrentKey"] = self.peers_on_current_key
        out["advisories"] = [a.to_dict() for a in self.advisories]
        out["advisoryCount"] = len(self.advisories)
        if self.lanes is not None:
            out["lanes"] = self.lanes
        return out


def _advisories(obj: Mapping[str, Any], *, name: str | None) -> tuple[Advisory, ...]:
    """status.advisories; advisoryCount, written beside them, must count them."""
    items = _list(obj.get("advisories", []), "status.advisories", name=name)
    found = tuple(Advisory.from_dict(a, name=name) for a in items)
    count = _optional_int(obj.get("advisoryCount"), "status.advisoryCount", name=name)
    if count is not None and count != len(found):
        raise ResourceError(
            f"status.advisoryCount is {count} but status.advisories has {len(found)}",
            name=name,
            field="status.advisoryCount",
        )
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class OwnerNode:
    """The Node a WireguardNode belongs to; deleting the Node garbage-collects it."""

    name: str
    uid: str

    def to_dict(self) -> dict[str, Any]:
        # Not a controller reference: the agent manages the resource, the Node only owns it.
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "name": self.name,
            "uid": self.uid,
            "blockOwnerDeletion": False,
            "controller": False,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class WireguardNode:
    """One WireguardNode; its name is the Node's name."""

    name: str
    spec: Spec
    status: Status | None = None
    owner: OwnerNode | None = None
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None

    @property
    def rotate_requested_at(self) -> str | None:
        return self.annotations.get(ROTATE_ANNOTATION)

    @classmethod
    def from_dict(cls, data: object) -> WireguardNode:
        """Read a resource as the apiserver sends it; raise ResourceError if it is malformed."""
        obj = _mapping(data, "the resource")
        meta = _mapping(obj.get("metadata"), "metadata")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ResourceError("metadata.name must be a non-empty string", field="metadata.name")
        if obj.get("kind", KIND) != KIND:
            raise ResourceError(f"kind must be {KIND}", name=name, field="kind")
        raw_status = obj.get("status")
        annotations = meta.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ResourceError(
                "metadata.annotations must map strings to strings",
                name=name,
                field="metadata.annotations",
            )
        return cls(
            name=name,
            spec=Spec.from_dict(obj.get("spec"), name=name),
            status=None if raw_status is None else Status.from_dict(raw_status, name=name),
            owner=_node_owner(meta.get("ownerReferences"), name=name),
            annotations=dict(annotations),
            uid=_optional_str(meta.get("uid"), "metadata.uid", name=name),
            resource_version=_optional_str(
                meta.get("resourceVersion"), "metadata.resourceVersion", name=name
            ),
            generation=_optional_int(meta.get("generation"), "metadata.generation", name=name),
        )

    def to_dict(self) -> dict[str, Any]:
        """The body to create or replace the resource with.

        With the status subresource the apiserver ignores `status` on create and update of the
        main resource; write it with `status_body()` through the status endpoint.
        """
        meta: dict[str, Any] = {"name": self.name}
        if self.owner is not None:
            meta["ownerReferences"] = [self.owner.to_dict()]
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        if self.resource_version is not None:
            # Lets a replace fail with 409 instead of overwriting a change it has not seen.
            meta["resourceVersion"] = self.resource_version
        out: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": meta,
            "spec": self.spec.to_dict(),
        }
        if self.status is not None:
            out["status"] = self.status.to_dict()
        return out

    def status_body(self) -> dict[str, Any]:
        """The body for the status subresource (a merge patch or a replace)."""
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name},
            "status": (self.status or Status()).to_dict(),
        }
        if self.resource_version is not None:
            body["metadata"]["resourceVersion"] = self.resource_version
        return body


def new(
    node_name: str,
    node_uid: str,
    public_key: str,
    *,
    listen_port: int = DEFAULT_LISTEN_PORT,
    lanes: Sequence[Lane] = (),
) -> WireguardNode:
    """The resource a node's agent creates for itself on first start."""
    return WireguardNode(
        name=node_name,
        spec=Spec(public_key=public_key, listen_port=listen_port, lanes=tuple(lanes)),
        owner=OwnerNode(name=node_name, uid=node_uid),
    )


def _node_owner(value: object, *, name: str) -> OwnerNode | None:
    refs = _list(value or [], "metadata.ownerReferences", name=name)
    for ref in refs:
        if isinstance(ref, Mapping) and ref.get("kind") == "Node" and ref.get("apiVersion") == "v1":
            return OwnerNode(
                name=_str(ref.get("name"), "metadata.ownerReferences[].name", name=name),
                uid=_str(ref.get("uid"), "metadata.ownerReferences[].uid", name=name),
            )
    return None


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


@contextlib.contextmanager
def _naming(name: str | None) -> Iterator[None]:
    """Put the resource's name on errors raised by checks that do not know it (__post_init__)."""
    try:
        yield
    except ResourceError as exc:
        if exc.name is not None or name is None:
            raise
        message = str(exc).removeprefix("WireguardNode: ")
        raise ResourceError(message, name=name, field=exc.field) from exc


def _mapping(value: object, field: str, *, name: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ResourceError(
            f"{field} must be an object, got {_type_name(value)}", name=name, field=field
        )
    return value


def _list(value: object, field: str, *, name: str | None) -> list[Any]:
    if not isinstance(value, list):
        raise ResourceError(
            f"{field} must be a list, got {_type_name(value)}", name=name, field=field
        )
    return value


def _str(value: object, field: str, *, name: str | None) -> str:
    if not isinstance(value, str):
        raise ResourceError(
            f"{field} must be a string, got {_type_name(value)}", name=name, field=field
        )
    return value


def _optional_str(value: object, field: str, *, name: str | None) -> str | None:
    return None if value is None else _str(value, field, name=name)


def _optional_int(value: object, field: str, *, name: str | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResourceError(
            f"{field} must be an integer, got {_type_name(value)}", name=name, field=field
        )
    return value


def _str_tuple(value: object, field: str, *, name: str | None) -> tuple[str, ...]:
    return tuple(_str(v, f"{field}[]", name=name) for v in _list(value, field, name=name))
