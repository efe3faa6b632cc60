"""A quiet engine reads what wakes it once, not to exhaustion (loop.QUIET): a burst that
arrives after a quiet moment must still go out whole and in order, and lone packets each at
once. The real loop and a real UDP bind on loopback (no root) carry node b's packets to node a,
a Device in this test that opens them; b's TUN is a queue the test fills.

    test --> QueuedTun --> Engine(Device b) --lo--> socket --> Device a (opens, delivers)
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from podwire.agent.engine import actions, ipc, loop, udp
from podwire.agent.engine import device as device_mod

A_ADDRESS, B_ADDRESS = "10.0.1.1", "10.0.2.1"


class QueuedTun:
    """A TUN device that holds the packets a test queues; readable while it holds any. It
    notes the limit of every read the loop makes."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._ours.setblocking(False)
        self.fd = self._ours.fileno()
        self.read_errors = self.write_errors = self.bad_offload = self.coalesced_writes = 0
        self.vnet_hdr = self.coalescing = False
        self.offloads: tuple[str, ...] = ()
        self.queue: collections.deque[bytes] = collections.deque()
        self.limits: list[int] = []
        self._lock = threading.Lock()

    def put(self, packets: list[bytes]) -> None:
        with self._lock:
            self.queue.extend(packets)
            with contextlib.suppress(BlockingIOError):
                self._theirs.send(b"!")

    def read_batch(self, limit: int) -> list[bytes]:
        with self._lock:
            self.limits.append(limit)
            batch = [self.queue.popleft() for _ in range(min(limit, len(self.queue)))]
            if not self.queue:
                with contextlib.suppress(BlockingIOError):
                    while self._ours.recv(4096):
                        pass
            return batch

    def write(self, packet: bytes) -> None:
        pass

    def write_batch(self, packets: list[bytes]) -> None:
        pass

    def mtu(self) -> int:
        return 1420

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()


def _packet(n: int) -> bytes:
    """An IPv4 UDP packet from b to a whose payload numbers it."""
    payload = n.to_bytes(4, "big") + bytes(60)
    src, dst = socket.inet_aton(B_ADDRESS), socket.inet_aton(A_ADDRESS)
    header = bytes([0x45, 0]) + (28 + len(payload)).to_bytes(2, "big") + bytes(4)
    header += bytes([64, 17, 0, 0]) + src + dst
    return header + bytes(8) + payload


class Pair:
    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.a_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.a_sock.bind(("127.0.0.1", 0))
        self.a_sock.settimeout(5)
        a_endpoint = ("127.0.0.1", self.a_sock.getsockname()[1])
        now = time.monotonic()
        self.a = device_mod.Device(rng=os.urandom, wall_clock=time.time)
        self.b = device_mod.Device(rng=os.urandom, wall_clock=time.time)
        self.a.set_private_key(os.urandom(32), now=now)
        self.b.set_private_key(os.urandom(32), now=now)
        assert self.a.public_key is not None and self.b.public_key is not None
        self.peer_b = self.a.add_peer(self.b.public_key)
        peer_a = self.b.add_peer(self.a.public_key)
        self.a.allowed_ips.insert(f"{B_ADDRESS}/32", self.peer_b)
        self.b.allowed_ips.insert(f"{A_ADDRESS}/32", peer_a)
        peer_a.endpoint = a_endpoint
        self.tun = QueuedTun()
        self.bind = udp.UdpBind.open(0, offloads=False)
        self.peer_b.endpoint = ("127.0.0.1", self.bind.port)
        self.listener = ipc.open_listener(tmp_path / "wgq.sock")
        self.engine = loop.Engine(
            device=self.b,
            tun=self.tun,  # type: ignore[arg-type]
            bind=self.bind,
            uapi_listener=self.listener,
        )
        self.runner = threading.Thread(target=self.engine.run, daemon=True)
        self.runner.start()
        self.delivered: list[bytes] = []

    def receive(self, count: int) -> list[int]:
        """What a delivers until it has count packets from b (answering the handshake)."""
        while len(self.delivered) < count:
            data, source = self.a_sock.recvfrom(65536)
            endpoint = (source[0], source[1])
            for action in self.a.receive_datagram(data, endpoint, time.monotonic()):
                if isinstance(action, actions.DeliverPacket):
                    self.delivered.append(action.packet)
                else:
                    self.a_sock.sendto(action.data, ("127.0.0.1", self.bind.port))
        return [int.from_bytes(p[28:32], "big") for p in self.delivered]

    def close(self) -> None:
        self.engine.stop("test")
        self.runner.join(timeout=10)
        self.engine.close()
        self.tun.close()
        self.listener.close()
        self.a_sock.close()


@pytest.fixture
def pair(tmp_path: pathlib.Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    yield p
    p.close()


def test_a_burst_after_a_quiet_moment_goes_out_whole_and_in_order(pair: Pair) -> None:
    pair.tun.put([_packet(0)])  # the handshake, then the session
    assert pair.receive(1) == [0]
    time.sleep(loop.QUIET * 20)
    before = len(pair.tun.limits)
    pair.tun.put([_packet(n) for n in range(1, 201)])
    assert pair.receive(201) == list(range(201))
    # The first read after the quiet took one packet; the rest were read in batches.
    burst_reads = pair.tun.limits[before:]
    assert burst_reads[0] == 1 and burst_reads[1] == loop.BATCH, burst_reads


def test_lone_packets_each_go_out_at_once(pair: Pair) -> None:
    pair.tun.put([_packet(0)])
    assert pair.receive(1) == [0]
    for n in range(1, 11):
        time.sleep(loop.QUIET * 5)
        pair.tun.put([_packet(n)])
        assert pair.receive(n + 1)[-1] == n
    assert pair.b.counters.transport_sent == 11
