"""Helpers for the engine's unit tests: a deterministic rng, hand-built IP packets, and an
in-memory wire that shuttles datagrams between two Devices on a fake clock.

Tests run with --import-mode=importlib, so the helpers are handed out as fixtures.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
from collections.abc import Callable

import pytest
from fastpaths import fast_path  # noqa: F401  (an autouse fixture: every test, both paths)

from podwire.agent import clock as clock_mod
from podwire.agent.engine import actions as actions_mod
from podwire.agent.engine import device as device_mod
from podwire.agent.engine import timers as timers_mod

Endpoint = tuple[str, int]


class Rng:
    """Deterministic randomness for Device(rng=...)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self._random.randbytes(n)


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, payload: bytes, *, protocol: int = 17) -> bytes:
    """A complete IPv4 packet with a correct header checksum."""
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0x1234,
        0,
        64,
        protocol,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes, *, next_header: int = 17) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


@dataclasses.dataclass
class Node:
    name: str
    device: device_mod.Device
    endpoint: Endpoint
    delivered: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Sent:
    source: str
    data: bytes
    endpoint: Endpoint
    time: float = 0.0

    @property
    def kind(self) -> int:
        return self.data[0]


class Wire:
    """Two Devices and the network between them. Each SendDatagram is delivered to the node
    whose endpoint it names (if `up`), from the sender's current endpoint; DeliverPackets are
    collected per node. Everything that crossed is kept in `log`."""

    def __init__(self, clock: clock_mod.FakeClock, a: Node, b: Node) -> None:
        self.clock = clock
        self.a = a
        self.b = b
        self.log: list[Sent] = []
        self.up = True
        # a test may drop or rewrite what crosses: returns None to lose the datagram
        self.filter: Callable[[Sent], Sent | None] = lambda sent: sent
        # Deliver as the I/O loop does a datagram read alone: Device.receive_alone first,
        # receive_datagram when it declines; taken_alone counts what it took.
        self.alone = False
        self.taken_alone = 0

    def node_at(self, endpoint: Endpoint) -> Node | None:
        for node in (self.a, self.b):
            if node.endpoint == endpoint:
                return node
        return None

    def run(self, node: Node, actions: list[actions_mod.Action]) -> None:
        queue = [(node, action) for action in actions]
        while queue:
            origin, action = queue.pop(0)
            if isinstance(action, actions_mod.DeliverPacket):
                origin.delivered.append(action.packet)
                continue
            sent = self.filter(
                Sent(origin.name, action.data, action.endpoint, self.clock.monotonic())
            )
            if sent is None:
                continue
            self.log.append(sent)
            target = self.node_at(sent.endpoint)
            if target is None or not self.up:
                continue
            replies = self.receive(target, sent.data, origin.endpoint)
            queue.extend((target, reply) for reply in replies)

    def receive(self, node: Node, data: bytes, source: Endpoint) -> list[actions_mod.Action]:
        """What node's Device makes of a datagram from source, now."""
        now = self.clock.monotonic()
        if self.alone:
            packet = node.device.receive_alone(data, source, now)
            if packet is not None:
                self.taken_alone += 1
                return [actions_mod.DeliverPacket(packet)]
        return node.device.receive_datagram(data, source, now)

    def state(self) -> dict[str, object]:
        """All that the tests of a shortcut compare: each node's counters, what it delivered
        and its peers' endpoints, byte counts, staged packets, send counters and timers, and
        every datagram that crossed."""

        def node(n: Node) -> dict[str, object]:
            peers = {}
            for key, p in n.device.peers.items():
                t = p.timers
                peers[key] = {
                    "endpoint": p.endpoint,
                    "tx": p.tx_bytes,
                    "rx": p.rx_bytes,
                    "staged": list(p.staged),
                    "send_counter": None if p.current is None else p.current.send_counter,
                    "timers": (
                        t.retransmit_handshake_at, t.send_keepalive_at, t.new_handshake_at,
                        t.zero_key_material_at, t.send_persistent_keepalive_at,
                        t.handshake_attempts, t.need_another_keepalive,
                        t.sent_lastminute_handshake,
                    ),
                }  # fmt: skip
            return {
                "counters": n.device.counters.as_dict(),
                "delivered": list(n.delivered),
                "peers": peers,
            }

        return {
            "a": node(self.a),
            "b": node(self.b),
            "log": [dataclasses.astuple(s) for s in self.log],
        }

    def send(self, node: Node, packet: bytes) -> None:
        self.run(node, node.device.send_packet(packet, self.clock.monotonic()))

    def tick(self) -> None:
        for node in (self.a, self.b):
            self.run(node, node.device.tick(self.clock.monotonic()))

    def advance(self, seconds: float, *, step: float = 0.1) -> None:
        """Let time pass, ticking both devices every `step` seconds as the I/O loop does."""
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() + step <= end + 1e-9:
            self.clock.advance(step)
            self.tick()
        remaining = end - self.clock.monotonic()
        if remaining > 1e-9:
            self.clock.advance(remaining)
            self.tick()

    def advance_with(self, other: Wire, seconds: float) -> None:
        """Let time pass for this wire and another on the same clock, both ticking at the same
        moments (as the I/O loop ticks): twins compared step by step stay in step."""
        assert other.clock is self.clock
        step = 1.0 if seconds > 1 else 0.05
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.tick()
            other.tick()

    def live_through_with(
        self,
        other: Wire,
        events: list[tuple[str, object]],
        happen: Callable[[Wire, str, object], None],
    ) -> None:
        """Both wires through the same events: ("wait", seconds) lets time pass for both, any
        other is happen(wire, kind, value) on each in turn; after each, both hold the same
        state (Wire.state)."""
        for kind, value in events:
            if kind == "wait":
                assert isinstance(value, float)
                self.advance_with(other, value)
                continue
            for wire in (self, other):
                happen(wire, kind, value)
            assert self.state() == other.state(), (kind, value)

    def set_persistent_keepalive(self, interval: int) -> None:
        for p in self.a.device.peers.values():
            p.persistent_keepalive_interval = interval

    def sent_by(self, name: str, kind: int | None = None, *, since: float = 0.0) -> list[Sent]:
        return [
            s
            for s in self.log
            if s.source == name and (kind is None or s.kind == kind) and s.time >= since
        ]

    def keepalives_by(self, name: str, *, since: float = 0.0) -> list[Sent]:
        return [s for s in self.sent_by(name, 4, since=since) if len(s.data) == 32]


A_ADDR4, B_ADDR4 = "10.0.1.1", "10.0.2.1"
A_ADDR6, B_ADDR6 = "fd00:1::1", "fd00:2::1"


def make_wire(
    clock: clock_mod.FakeClock,
    *,
    timers: timers_mod.ProtocolTimers | None = None,
    b_knows_a_endpoint: bool = False,
    seed: int = 1,
) -> Wire:
    """Node a (10.0.1.0/24, fd00:1::/64) and node b (10.0.2.0/24, fd00:2::/64), peered;
    a knows b's endpoint, b learns a's from the handshake unless told."""
    config = timers or timers_mod.ProtocolTimers()
    a = Node(
        "a",
        device_mod.Device(rng=Rng(seed), wall_clock=clock.wall, timers=config),
        ("192.0.2.1", 51820),
    )
    b = Node(
        "b",
        device_mod.Device(rng=Rng(seed + 1000), wall_clock=clock.wall, timers=config),
        ("192.0.2.2", 51821),
    )
    a.device.set_private_key(Rng(seed + 1)(32), now=clock.monotonic())
    b.device.set_private_key(Rng(seed + 2)(32), now=clock.monotonic())
    assert a.device.public_key is not None and b.device.public_key is not None
    peer_b = a.device.add_peer(b.device.public_key)
    peer_a = b.device.add_peer(a.device.public_key)
    a.device.allowed_ips.insert("10.0.2.0/24", peer_b)
    a.device.allowed_ips.insert("fd00:2::/64", peer_b)
    b.device.allowed_ips.insert("10.0.1.0/24", peer_a)
    b.device.allowed_ips.insert("fd00:1::/64", peer_a)
    peer_b.endpoint = b.endpoint
    if b_knows_a_endpoint:
        peer_a.endpoint = a.endpoint
    return Wire(clock, a, b)


@pytest.fixture
def rng_factory() -> type[Rng]:
    return Rng


class Packets:
    """Builders for hand-made IP packets."""

    ipv4 = staticmethod(ipv4_packet)
    ipv6 = staticmethod(ipv6_packet)


@pytest.fixture
def packets() -> type[Packets]:
    return Packets


@pytest.fixture
def wire_factory(fake_clock: clock_mod.FakeClock) -> Callable[..., Wire]:
    """make_wire(**options) on the test's fake clock."""

    def factory(**options: object) -> Wire:
        return make_wire(fake_clock, **options)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def twin_wires(wire_factory: Callable[..., Wire]) -> Callable[..., tuple[Wire, Wire]]:
    """twin_wires(timers, persistent): two wires made alike on the test's clock, a's peer
    with that persistent keepalive, for a shortcut's test to live through the same events."""

    def make(timers: timers_mod.ProtocolTimers | None, persistent: int) -> tuple[Wire, Wire]:
        twins = (wire_factory(timers=timers), wire_factory(timers=timers))
        for twin in twins:
            twin.set_persistent_keepalive(persistent)
        return twins

    return make


@pytest.fixture
def wire(wire_factory: Callable[..., Wire]) -> Wire:
    return wire_factory()
