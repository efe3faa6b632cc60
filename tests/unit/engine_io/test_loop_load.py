"""The I/O loop under a handshake flood, without root: a fake TUN and a fake UDP bind (each a
socketpair, so the loop's selector wakes for them) around a real Device and the real loop.

    100 flooders (10.66.0.x) --+
                               +--> FakeBind --> Engine(Device b) --> QuietTun
    legitimate peer a ---------+

The flooders know only b's public key (which every WireguardNode publishes): their initiations
carry a valid mac1 and each costs b a Diffie-Hellman unless b notices the load. A flooder that
gets a cookie reply stamps mac2 from then on, as a real one at its address could.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import socket
import time

import pytest
from quiettun import QuietTun

from podwire.agent import clock as clock_mod
from podwire.agent.engine import actions as actions_mod
from podwire.agent.engine import constants, cookie, ipc, loop, messages, noise, ratelimiter
from podwire.agent.engine import device as device_mod
from podwire.agent.engine.counters import Drop

Endpoint = tuple[str, int]
B_ENDPOINT: Endpoint = ("192.0.2.2", 51820)
A_ENDPOINT: Endpoint = ("192.0.2.1", 51820)
FLOODERS = [(f"10.66.0.{i}", 40000 + i) for i in range(1, 101)]


class FakeBind:
    """A UDP bind fed from a queue; readable while the queue holds datagrams. What the engine
    sends is handed to `on_send` (the other side's reaction) and kept in `sent`."""

    def __init__(self, on_empty: collections.abc.Callable[[], None]) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._ours.setblocking(False)
        self._theirs.setblocking(False)
        self.sockets = [self._ours]
        self.port = B_ENDPOINT[1]
        self.dual_stack = False
        self.send_errors = 0
        self.gso_off_reason = ""
        self.steered = False
        self.steer_off_reason = ""
        self.offloads_wanted = False
        self.gso_sends = 0
        self.gro_receives = 0
        self.queue: collections.deque[tuple[bytes, Endpoint]] = collections.deque()
        self.sent: list[actions_mod.SendDatagram] = []
        self.on_send: collections.abc.Callable[[bytes, Endpoint], None] = lambda d, e: None
        self._on_empty = on_empty

    def feed(self, data: bytes, source: Endpoint) -> None:
        self.queue.append((data, source))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: readable already
            self._theirs.send(b"!")

    def receive_batch(self, sock: socket.socket, limit: int) -> list[tuple[bytes, Endpoint]]:
        try:
            while self._ours.recv(4096):
                pass
        except BlockingIOError:
            pass
        batch = [self.queue.popleft() for _ in range(min(limit, len(self.queue)))]
        if self.queue:
            self._wake()
        else:
            self._on_empty()
        return batch

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        self.sent.append(actions_mod.SendDatagram(data, endpoint))
        self.on_send(data, endpoint)

    def send_batch(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        for data, endpoint in datagrams:
            self.send(data, endpoint)

    def offloads(self) -> list[str]:
        return []

    def set_fwmark(self, mark: int) -> None:
        pass

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()


class Harness:
    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.clock = clock_mod.FakeClock()
        self.device = device_mod.Device(rng=os.urandom, wall_clock=self.clock.wall)
        self.device.set_private_key(os.urandom(32), now=self.clock.monotonic())
        self.tun = QuietTun()
        self.bind = FakeBind(on_empty=lambda: self.engine.stop("drained"))
        self.listener = ipc.open_listener(tmp_path / "wgx.sock")
        self.engine = loop.Engine(
            device=self.device,
            tun=self.tun,  # type: ignore[arg-type]
            bind=self.bind,  # type: ignore[arg-type]
            uapi_listener=self.listener,
            clock=self.clock.monotonic,
        )

    def drain(self) -> None:
        """Runs the real loop until every fed datagram has been handed to the Device."""
        self.engine._stopping = False
        self.engine.run()

    def close(self) -> None:
        self.engine.close()
        self.tun.close()
        self.listener.close()


@pytest.fixture
def harness(tmp_path: pathlib.Path) -> collections.abc.Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


def _unknown_initiation(responder_public: bytes) -> bytes:
    """An initiation from a key the responder does not know, macs zero."""
    identity = noise.StaticIdentity(os.urandom(32))
    handshake = noise.Handshake(responder_public)
    handshake.precompute(identity)
    message = noise.create_initiation(
        handshake,
        identity,
        ephemeral_private=os.urandom(32),
        sender_index=7,
        wall_time=time.time(),
    )
    return message.pack()


class Flooders:
    """A hundred sources of mac1-valid initiations; each takes in the cookies sent to it."""

    def __init__(self, harness: Harness) -> None:
        assert harness.device.public_key is not None
        self.harness = harness
        self.body = _unknown_initiation(harness.device.public_key)
        self.generators = {
            source: cookie.CookieGenerator(harness.device.public_key) for source in FLOODERS
        }

    def round(self, per_source: int) -> None:
        now = self.harness.clock.monotonic()
        for _ in range(per_source):
            for source, generator in self.generators.items():
                self.harness.bind.feed(generator.stamp(self.body, now=now), source)

    def on_send(self, data: bytes, endpoint: Endpoint) -> None:
        generator = self.generators.get(endpoint)
        if generator is not None and data[0] == constants.MESSAGE_COOKIE_REPLY:
            reply = messages.parse_cookie_reply(data)
            generator.consume_reply(reply, now=self.harness.clock.monotonic())


def _sent_kinds(harness: Harness, kind: int) -> int:
    return sum(1 for s in harness.bind.sent if s.data[0] == kind)


def test_a_flood_of_mac1_valid_initiations_brings_cookies_and_the_rate_limit(
    harness: Harness,
) -> None:
    flooders = Flooders(harness)
    harness.bind.on_send = flooders.on_send
    for _ in range(6):
        flooders.round(per_source=3)
        harness.drain()
        harness.clock.advance(0.01)
    counts = harness.device.counters
    total = 6 * 3 * len(FLOODERS)
    assert counts.cookie_replies_sent > 0
    assert _sent_kinds(harness, constants.MESSAGE_COOKIE_REPLY) == counts.cookie_replies_sent
    assert counts.drops[Drop.RATE_LIMITED] > 0
    # A Diffie-Hellman was spent only on the batch that showed the load, then on each source's
    # burst once it held a cookie; the rest were answered with cookies or refused.
    assert counts.drops[Drop.NO_PEER] <= loop.BATCH + len(FLOODERS) * ratelimiter.PACKETS_BURST
    assert counts.drops[Drop.NO_PEER] < total // 2


def test_the_load_is_held_for_a_second_after_the_flood_then_released(
    harness: Harness,
) -> None:
    flooders = Flooders(harness)
    flooders.round(per_source=3)
    harness.drain()
    assert harness.device.counters.cookie_replies_sent > 0
    # A lone initiation half a second later still needs a cookie...
    harness.clock.advance(0.5)
    before = harness.device.counters.cookie_replies_sent
    lone = cookie.CookieGenerator(harness.device.public_key or b"").stamp(
        flooders.body, now=harness.clock.monotonic()
    )
    harness.bind.feed(lone, ("10.77.0.1", 1))
    harness.drain()
    assert harness.device.counters.cookie_replies_sent == before + 1
    # ...and, once a second has passed without a backlog, it costs its Diffie-Hellman again.
    harness.clock.advance(1.1)
    no_peer = harness.device.counters.drops[Drop.NO_PEER]
    harness.bind.feed(lone, ("10.77.0.1", 1))
    harness.drain()
    assert harness.device.counters.cookie_replies_sent == before + 1
    assert harness.device.counters.drops[Drop.NO_PEER] == no_peer + 1


def test_a_legitimate_peer_gets_through_a_flood_with_its_cookie(harness: Harness) -> None:
    """Peer a loses its session during the flood: it gets a cookie, and its retry with mac2
    is answered although a hundred sources keep flooding."""
    a = device_mod.Device(rng=os.urandom, wall_clock=harness.clock.wall)
    a.set_private_key(os.urandom(32), now=harness.clock.monotonic())
    assert a.public_key is not None and harness.device.public_key is not None
    b_peer = a.add_peer(harness.device.public_key)
    b_peer.endpoint = B_ENDPOINT
    a.allowed_ips.insert("10.0.2.0/24", b_peer)
    a_peer = harness.device.add_peer(a.public_key)
    harness.device.allowed_ips.insert("10.0.1.0/24", a_peer)
    flooders = Flooders(harness)

    def on_send(data: bytes, endpoint: Endpoint) -> None:
        flooders.on_send(data, endpoint)
        if endpoint == A_ENDPOINT:
            for action in a.receive_datagram(data, B_ENDPOINT, harness.clock.monotonic()):
                assert isinstance(action, actions_mod.SendDatagram)
                harness.bind.feed(action.data, A_ENDPOINT)

    harness.bind.on_send = on_send

    def a_sends() -> None:
        packet = bytes([0x45]) + bytes(11) + bytes([10, 0, 1, 1, 10, 0, 2, 1]) + b"payload!"
        packet = packet[:2] + len(packet).to_bytes(2, "big") + packet[4:]
        for action in a.send_packet(packet, harness.clock.monotonic()):
            assert isinstance(action, actions_mod.SendDatagram)
            harness.bind.feed(action.data, A_ENDPOINT)

    flooders.round(per_source=3)
    a_sends()  # behind the flood's first batches: answered with a cookie
    flooders.round(per_source=3)
    harness.drain()
    assert a.counters.cookie_replies_received == 1
    assert harness.device.counters.handshakes_completed == 0
    for _ in range(60):  # 6 s of flood, 100 ms at a time; a retransmits at 5 s
        harness.clock.advance(0.1)
        flooders.round(per_source=3)  # 30 a second from each: past the rate limit
        for action in a.tick(harness.clock.monotonic()):
            assert isinstance(action, actions_mod.SendDatagram)
            harness.bind.feed(action.data, A_ENDPOINT)
        harness.drain()
    assert a.counters.handshakes_completed == 1
    assert len(harness.tun.written) == 1
    assert harness.device.counters.drops[Drop.RATE_LIMITED] > 0


def test_a_routing_loop_is_logged_once_per_peer(harness: Harness) -> None:
    import structlog.testing

    p = harness.device.add_peer(os.urandom(32))
    p.endpoint = ("192.0.2.9", 51820)
    p.routing_loops = 3
    with structlog.testing.capture_logs() as logs:
        harness.engine._housekeeping(harness.clock.monotonic())
        p.routing_loops = 4
        harness.engine._housekeeping(harness.clock.monotonic())
    loops = [entry for entry in logs if entry["event"] == "routing_loop"]
    assert len(loops) == 1
    assert loops[0]["endpoint"] == "192.0.2.9:51820"


def test_the_loop_keeps_serving_while_a_huge_request_trickles_in(tmp_path: pathlib.Path) -> None:
    """A client trickles a 4 MB request in 1 KB pieces without pause; meanwhile the loop keeps
    handling datagrams (each within 2 s) and answers another client's get at once."""
    import threading

    h = Harness(tmp_path)
    engine = loop.Engine(
        device=h.device,
        tun=h.tun,  # type: ignore[arg-type]
        bind=h.bind,  # type: ignore[arg-type]
        uapi_listener=h.listener,
    )
    h.bind._on_empty = lambda: None
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    request = b"set=1\n" + b"fwmark=0\n" * (4 * 1024 * 1024 // 9) + b"\n"
    trickler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trickler.connect(str(tmp_path / "wgx.sock"))
    done = threading.Event()

    def trickle() -> None:
        for i in range(0, len(request), 1024):
            trickler.sendall(request[i : i + 1024])
        done.set()

    sender = threading.Thread(target=trickle, daemon=True)
    try:
        sender.start()
        time.sleep(0.05)
        handled = []
        for _ in range(5):  # datagrams the loop must take while the request trickles in
            before = h.device.counters.drops[Drop.UNKNOWN_TYPE]
            h.bind.feed(b"\x09\x00\x00\x00junk", ("192.0.2.50", 1))
            deadline = time.monotonic() + 2
            while h.device.counters.drops[Drop.UNKNOWN_TYPE] == before:
                assert time.monotonic() < deadline, "the loop stopped taking datagrams"
                time.sleep(0.005)
            handled.append(time.monotonic())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as getter:
            getter.settimeout(2)
            getter.connect(str(tmp_path / "wgx.sock"))
            getter.sendall(b"get=1\n\n")
            answer = b""
            while not answer.endswith(b"\n\n"):
                answer += getter.recv(65536)
        assert answer.endswith(b"errno=0\n\n")
        sender.join(timeout=120)
        trickler.settimeout(60)
        assert trickler.recv(64) == b"errno=0\n\n"
    finally:
        engine.stop("test")
        h.bind.feed(b"\x09", ("192.0.2.50", 1))  # wakes the loop
        runner.join(timeout=10)
        trickler.close()
        h.close()
