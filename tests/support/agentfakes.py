"""Test doubles for the agent's components: a device, routes, watch sources and an apiserver.

Each behaves like the real thing where the agent could tell the difference: the device is a
`wgdevice.PeerTable` (an allowed-ip given to one peer is taken from the other), the watch
sources keep a copy and call `on_change` as an informer does, the apiserver answers 404 and 409
as the real one does. They live with the tests, not in the product.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import pathlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from podwire.agent import app, config, keys, reconcile, watches, wgdevice
from podwire.agent import clock as clock_mod
from podwire.agent import controller as controller_mod
from podwire.agent.datapath import routes as dp_routes

Obj = dict[str, Any]


class FakeBackend:
    """An in-memory WireGuard device with the kernel's semantics."""

    datapath = "userspace"

    def __init__(self, *, log: list[str] | None = None, routes: FakeRoutes | None = None) -> None:
        self.exists = False
        self.private_key: bytes | None = None
        self.listen_port = 0
        self.table = wgdevice.PeerTable()
        self.applied: list[list[wgdevice.PeerChange]] = []  # every non-empty request
        self.fail_next: Exception | None = None  # raised (once) by the next apply
        self.fail_always: Exception | None = None  # raised by every apply until cleared
        self.generation = 0  # lose() bumps it, as a restarted engine gets a new identity
        self.reads = 0
        # What was done, in order; pass FakeRoutes' log to see the two interleaved.
        self.log: list[str] = [] if log is None else log
        # The routing table whose routes through the device vanish with it, as the kernel's do.
        self.routes = routes

    def lose(self) -> None:
        """The device vanishes with its peers, as when the engine dies."""
        self.exists = False
        self.table = wgdevice.PeerTable()
        self.private_key = None
        self.generation += 1
        if self.routes is not None:
            self.routes.routes.clear()  # the fail-closed routes do not go through the device

    @property
    def peers(self) -> dict[str, wgdevice.Peer]:
        return {p.public_key: p for p in self.table.peers()}

    def ensure_device(self) -> None:
        if not self.exists:
            self.log.append("device")
        self.exists = True

    def identity(self) -> object | None:
        return self.generation if self.exists else None

    def set_private_key(self, raw: bytes) -> None:
        self.private_key = raw

    def set_listen_port(self, port: int) -> None:
        self.listen_port = port

    def read(self) -> wgdevice.Device:
        if not self.exists:
            raise OSError("no such device")
        self.reads += 1
        public = keys.encode_key(keys.public_key_of(self.private_key)) if self.private_key else None
        return wgdevice.Device(
            has_private_key=self.private_key is not None,
            public_key=public,
            listen_port=self.listen_port,
            fwmark=0,
            peers=tuple(self.table.peers()),
        )

    def apply(self, changes: Sequence[wgdevice.PeerChange]) -> None:
        if self.fail_always is not None:
            raise self.fail_always
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if not self.exists:
            raise OSError("no such device")
        if changes:
            self.applied.append(list(changes))
            self.table.apply(changes)
            self.log.append("peers")

    def greeted(self) -> list[str]:
        """Peers sent a keepalive at once (persistent keepalive switched on), in order."""
        return [c.public_key for req in self.applied for c in req if c.persistent_keepalive == 1]

    def features(self) -> tuple[str, ...]:
        return ()

    def mtu(self) -> int:
        return 1420


class FakeRoutes:
    """The routing table as far as podwire's routes go."""

    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict
        self.fail_closed: list[wgdevice.IPNetwork] = []
        self.routes: set[wgdevice.IPNetwork] = set()
        self.log: list[str] = []  # what was done, in order, across the fakes that share it
        # What guard keeps in place, as a person would remove it by hand: "<kind> <dst> <table>".
        self.guarded: set[str] = set()
        self.foreign: list[str] = []  # other programs' routes that bypass the device
        self.guards = 0
        self.competing_scans = 0  # guard passes that also looked for competing routes

    def install_fail_closed(self, cidrs: Iterable[wgdevice.IPNetwork]) -> None:
        cidrs = list(cidrs)
        self.fail_closed.extend(cidrs)
        self.guarded |= {f"unreachable {c} main" for c in cidrs}
        if self.strict:
            self.guarded |= {f"unreachable {c} podwire" for c in cidrs}
        self.log.append("fail_closed")

    def guard(
        self,
        cluster: Sequence[wgdevice.IPNetwork],
        *,
        own: Sequence[wgdevice.IPNetwork],
        fail_closed: bool,
        underlay_address: str | None,
        look_for_competing: bool = True,
    ) -> dp_routes.Guarded:
        """As the real guard: puts back what is missing, takes stale throws and rules away."""
        self.guards += 1
        self.competing_scans += look_for_competing
        want = {f"unreachable {c} main" for c in cluster} if fail_closed else set()
        if self.strict:
            want |= {f"unreachable {c} podwire" for c in cluster} if fail_closed else set()
            want |= {f"throw {c} podwire" for c in own}
            want |= {f"rule to {c} lookup podwire" for c in cluster}
            if underlay_address is not None:
                want |= {f"rule from {c} to {o} blackhole" for c in cluster for o in own}
        restored = sorted(want - self.guarded)
        self.guarded = want | {g for g in self.guarded if g.startswith("unreachable")}
        return dp_routes.Guarded(
            tuple(restored), tuple(self.foreign) if look_for_competing else None
        )

    def list_routes(self) -> list[wgdevice.IPNetwork]:
        return sorted(self.routes, key=str)

    def apply(self, plan: reconcile.RoutePlan) -> None:
        self.log.append("routes")
        self.routes |= set(plan.add)
        self.routes -= set(plan.remove)


@dataclasses.dataclass
class MemorySource:
    """A watch source over a dict: `put` and `delete` play watch events, `list` a relist."""

    kind: str
    on_change: Callable[[], None] = lambda: None
    synced: bool = False
    last_error: str = ""
    restarts: int = 0
    store: dict[str, Obj] = dataclasses.field(default_factory=dict)

    @property
    def objects(self) -> Mapping[str, Obj]:
        return self.store

    def snapshot(self) -> list[Obj]:
        return list(self.store.values())

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def list(self, objs: Iterable[Obj]) -> None:
        self.store = {o["metadata"]["name"]: o for o in objs}
        self.synced, self.last_error = True, ""
        self.on_change()

    def put(self, obj: Obj) -> None:
        self.store[obj["metadata"]["name"]] = obj
        self.on_change()

    def delete(self, name: str) -> None:
        self.store.pop(name, None)
        self.on_change()

    def fail(self, error: str) -> None:
        """The apiserver went away: the copy stays as it was."""
        self.last_error = error
        self.restarts += 1


class FakeApiError(Exception):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FakeApi:
    """Nodes and WireguardNodes as the apiserver keeps them, with its 404 and 409."""

    def __init__(self) -> None:
        self.nodes: dict[str, Obj] = {}
        self.wgnodes: dict[str, Obj] = {}
        self.conflicts = 0  # the next this many writes of a WireguardNode answer 409
        self.down = False  # every call fails as with the apiserver away
        self.events: list[dict[str, Any]] = []
        self.status_patches: list[Obj] = []
        self.writes: list[str] = []
        self._rv = 0
        # Called with each WireguardNode as written, as a watch delivers it to the informers.
        self.on_write: Callable[[Obj], None] = lambda obj: None

    def _check(self) -> None:
        if self.down:
            raise FakeApiError("connection refused")

    def _version(self, obj: Obj) -> Obj:
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        return obj

    def _conflict(self) -> None:
        if self.conflicts:
            self.conflicts -= 1
            raise FakeApiError("the object has been modified", status=409)

    def get_node(self, name: str) -> Obj | None:
        self._check()
        node = self.nodes.get(name)
        return copy.deepcopy(node) if node else None

    def get_wgnode(self, name: str) -> Obj | None:
        self._check()
        obj = self.wgnodes.get(name)
        return copy.deepcopy(obj) if obj else None

    def create_wgnode(self, body: Obj) -> Obj:
        self._check()
        self._conflict()
        name = body["metadata"]["name"]
        if name in self.wgnodes:
            raise FakeApiError(f"wgnodes {name} already exists", status=409)
        self.wgnodes[name] = self._version(copy.deepcopy(body))
        self.writes.append(f"create {name}")
        self.on_write(copy.deepcopy(self.wgnodes[name]))
        return copy.deepcopy(self.wgnodes[name])

    def replace_wgnode(self, body: Obj) -> Obj:
        self._check()
        self._conflict()
        name = body["metadata"]["name"]
        self.wgnodes[name] = self._version(copy.deepcopy(body))
        self.writes.append(f"replace {name}")
        self.on_write(copy.deepcopy(self.wgnodes[name]))
        return copy.deepcopy(self.wgnodes[name])

    def patch_wgnode_status(self, name: str, patch: Obj) -> Obj:
        self._check()
        obj = self.wgnodes[name]
        obj["status"] = copy.deepcopy(patch["status"])
        self._version(obj)
        self.status_patches.append(copy.deepcopy(patch["status"]))
        self.on_write(copy.deepcopy(obj))
        return copy.deepcopy(obj)

    def edit_wgnode(self, name: str, **spec: Any) -> Obj:
        """Someone else (an admin, a rogue agent) changes the spec, as the watch then shows."""
        self._check()
        obj = self.wgnodes[name]
        obj["spec"] = {**obj.get("spec", {}), **spec}
        self._version(obj)
        self.writes.append(f"edit {name}")
        self.on_write(copy.deepcopy(obj))
        return copy.deepcopy(obj)

    def emit_event(self, *, involved: Obj, reason: str, message: str, event_type: str) -> None:
        self._check()
        self.events.append(
            {
                "name": involved["metadata"]["name"],
                "reason": reason,
                "type": event_type,
                "message": message,
            }
        )


def node(name: str, address: str | None, cidrs: Sequence[str], *, uid: str | None = None) -> Obj:
    """A Node as the control plane writes it: InternalIP and pod CIDRs."""
    status = {"addresses": [{"type": "InternalIP", "address": address}]} if address else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "uid": uid or f"uid-{name}"},
        "spec": {"podCIDRs": list(cidrs)},
        "status": status,
    }


def wgnode_obj(name: str, public_key: str, port: int = 51871) -> Obj:
    return {
        "apiVersion": "podwire.io/v1alpha1",
        "kind": "WireguardNode",
        "metadata": {"name": name},
        "spec": {"publicKey": public_key, "listenPort": port},
    }


def net(text: str) -> wgdevice.IPNetwork:
    return ipaddress.ip_network(text)


@dataclasses.dataclass
class OtherNode:
    """Another node of the cluster, as its Node and WireguardNode show it."""

    name: str
    public_key: str
    address: str
    cidrs: tuple[str, ...]
    port: int = 51871

    def node(self) -> Obj:
        return node(self.name, self.address, self.cidrs)

    def wgnode(self) -> Obj:
        return wgnode_obj(self.name, self.public_key, self.port)

    @property
    def endpoint(self) -> wgdevice.Endpoint:
        return wgdevice.make_endpoint(self.address, self.port)

    @property
    def networks(self) -> set[wgdevice.IPNetwork]:
        return {net(c) for c in self.cidrs}


def other_node(index: int) -> OtherNode:
    """Node `n<index>`: a fresh key, InternalIP 192.0.2.<index>, pod CIDR 10.244.<index>.0/24."""
    return OtherNode(
        name=f"n{index}",
        public_key=keys.PrivateKey.generate().public_key_b64(),
        address=f"192.0.2.{index}",
        cidrs=(f"10.244.{index}.0/24",),
    )


class AgentHarness:
    """An agent assembled by `app.assemble` on the doubles above and driven by hand.

    No thread, no sleep, no root, no apiserver: the test lists and changes the watch sources,
    calls `step` for one turn of the control loop and moves the fake clock. The own
    WireguardNode, as the fake apiserver holds it, reaches the wgnodes source as a watch
    would deliver it.
    """

    NODE = "n1"
    ADDRESS = "192.0.2.1"
    CIDR = "10.244.1.0/24"
    CLUSTER_CIDR = "10.244.0.0/16"

    def __init__(
        self, key_path: pathlib.Path, *, resync_period: float = 300.0, apiserver: str = ""
    ) -> None:
        self.cfg = config.Config(
            node_name=self.NODE,
            key_path=key_path,
            cluster_pod_cidrs=(net(self.CLUSTER_CIDR),),
            resync_period=resync_period,
        )
        self.api = FakeApi()
        self.api.nodes[self.NODE] = self.own_node()
        self.wakeup = threading.Event()
        self.nodes = MemorySource("nodes", on_change=self.wakeup.set)
        self.wgnodes = MemorySource("wgnodes", on_change=self.wakeup.set)
        self.api.on_write = self.wgnodes.put
        self.routes = FakeRoutes()
        self.backend = FakeBackend(log=self.routes.log, routes=self.routes)
        self.clock = clock_mod.FakeClock()
        self.underlay: list[str | None] = []  # the addresses the backend was opened for
        self.agent = app.assemble(
            self.cfg,
            api=self.api,
            api_error=FakeApiError,
            emit=self.api.emit_event,
            watched=watches.Watches(self.nodes, self.wgnodes),
            wakeup=self.wakeup,
            open_backend=self._open_backend,
            routes=self.routes,
            clock=self.clock,
            apiserver=apiserver,
        )
        self._local = self.agent.broadcaster.subscribe()

    def _open_backend(self, address: str | None) -> FakeBackend:
        self.underlay.append(address)
        return self.backend

    @property
    def controller(self) -> controller_mod.Controller:
        return self.agent.controller

    def own_node(self) -> Obj:
        return node(self.NODE, self.ADDRESS, [self.CIDR])

    def start(self) -> None:
        """The agent started as in the cluster, without the control loop's thread.

        The key file is dated by the fake clock (made now, unless the test made one), since
        the key's age comes from the file and is compared with rotation requests.
        """
        path = self.cfg.key_path
        if not path.exists():
            keys.load_or_create(path)
            os.utime(path, (self.clock.wall(), self.clock.wall()))
        assert self.agent.start(threading.Event(), loop=False)

    def list(self, *others: OtherNode) -> None:
        """Both sources list: the own Node and WireguardNode (if published) and `others`."""
        self.list_nodes(*others)
        own = [copy.deepcopy(o) for o in self.api.wgnodes.values()]
        self.wgnodes.list([*own, *(o.wgnode() for o in others)])

    def list_nodes(self, *others: OtherNode) -> None:
        self.nodes.list([self.own_node(), *(o.node() for o in others)])

    def join(self, other: OtherNode) -> None:
        self.nodes.put(other.node())
        self.wgnodes.put(other.wgnode())

    def leave(self, other: OtherNode) -> None:
        self.nodes.delete(other.name)
        self.wgnodes.delete(other.name)

    def step(self, *, woke: bool = True) -> bool:
        """One turn of the control loop; True when it ran a reconcile pass."""
        return self.controller.step(woke=woke)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def peers(self) -> dict[str, wgdevice.Peer]:
        """The device's peers by public key."""
        return self.backend.peers

    def conditions(self) -> dict[str, tuple[str, str, str]]:
        """The own WireguardNode's conditions as written to the apiserver: status, reason, message."""
        status = self.api.wgnodes[self.NODE].get("status", {})
        return {
            c["type"]: (c["status"], c["reason"], c["message"])
            for c in status.get("conditions", [])
        }

    def local_events(self) -> list[tuple[str, str]]:
        """(type, reason) of the events streamed to the CLI since the last call."""
        out = []
        while not self._local.empty():
            ev = self._local.get_nowait()
            out.append((ev.type, ev.reason))
        return out

    def kube_events(self, reason: str) -> list[str]:
        """The objects a Kubernetes Event with `reason` was recorded on, one per Event."""
        return [e["name"] for e in self.api.events if e["reason"] == reason]
