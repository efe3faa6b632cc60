"""The real loop on a real steered port under a flood, over loopback (no root): the flood is
read only within the budget, the kernel drops the rest and the loop counts that as load, and
data that arrives meanwhile is read in full.

    20 flooders 127.0.1.x --+
                            +--lo--> [budgeted | data | priority] --> Engine(Device b)
    a data sender 127.0.0.9 +                                          (a TUN that reads nothing)
"""

from __future__ import annotations

import os
import pathlib
import socket
import threading
import time

import pytest

from podwire.agent.engine import constants, cookie, ipc, loop, noise, udp
from podwire.agent.engine import device as device_mod
from podwire.agent.engine.counters import Drop

FLOODERS = [f"127.0.1.{i}" for i in range(1, 21)]
ROUNDS = 1000
DATA_EVERY = 50


class QuietTun:
    """A TUN device that reads nothing and keeps what is written to it."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self.fd = self._ours.fileno()
        self.read_errors = self.write_errors = self.bad_offload = self.coalesced_writes = 0
        self.vnet_hdr = self.coalescing = False
        self.offloads: tuple[str, ...] = ()
        self.written: list[bytes] = []

    def read_batch(self, limit: int) -> list[bytes]:
        return []

    def write(self, packet: bytes) -> None:
        self.written.append(packet)

    def write_batch(self, packets: list[bytes]) -> None:
        self.written += packets

    def mtu(self) -> int:
        return 1420

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()


def _initiation(responder_public: bytes) -> bytes:
    """A mac1-valid initiation from a key the responder does not know."""
    identity = noise.StaticIdentity(os.urandom(32))
    handshake = noise.Handshake(responder_public)
    handshake.precompute(identity)
    message = noise.create_initiation(
        handshake, identity, ephemeral_private=os.urandom(32), sender_index=7, wall_time=time.time()
    )
    return cookie.CookieGenerator(responder_public).stamp(message.pack(), now=0.0)


@pytest.mark.parametrize("spoofing", [False, True], ids=["unknown sources", "peers' endpoints"])
def test_under_a_flood_the_loop_reads_handshakes_within_its_budget_and_all_the_data(
    tmp_path: pathlib.Path, spoofing: bool
) -> None:
    """From unknown sources the flood takes the budgeted socket; from addresses that are
    peers' endpoints (spoofed, or a peer gone rogue) the priority socket, which has a budget
    of its own under load, larger, so a flood there cannot starve the data either."""
    device = device_mod.Device(rng=os.urandom, wall_clock=time.time)
    device.set_private_key(os.urandom(32), now=time.monotonic())
    assert device.public_key is not None
    if spoofing:
        for i, host in enumerate(FLOODERS):
            device.add_peer(bytes([i + 1]) * 32).endpoint = (host, 51820)
    tun = QuietTun()
    bind = udp.UdpBind.open(0, offloads=False)
    listener = ipc.open_listener(tmp_path / "wgf.sock")
    engine = loop.Engine(device=device, tun=tun, bind=bind, uapi_listener=listener)  # type: ignore[arg-type]
    runner = threading.Thread(target=engine.run, daemon=True)
    senders = []
    try:
        assert bind.steered, bind.steer_off_reason
        runner.start()
        data = _initiation(device.public_key)
        # Transport messages naming no session: each one read is counted as such.
        transport = bytes([constants.MESSAGE_TRANSPORT, 0, 0, 0]) + bytes(28)
        for host in [*FLOODERS, "127.0.0.9"]:
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind((host, 0))
            senders.append(sender)
        target = ("127.0.0.1", bind.port)
        began = time.monotonic()
        data_sent = 0
        for i in range(ROUNDS):
            for sender in senders[:-1]:
                sender.sendto(data, target)
            if i % DATA_EVERY == 0:
                senders[-1].sendto(transport, target)
                data_sent += 1
                time.sleep(0.005)
        deadline = time.monotonic() + 5
        while device.counters.drops[Drop.UNKNOWN_RECEIVER] < data_sent:
            assert time.monotonic() < deadline, "data was lost behind the flood"
            time.sleep(0.01)
        elapsed = time.monotonic() - began
    finally:
        engine.stop("test")
        runner.join(timeout=10)
        kernel_drops = bind.kernel_drops() or 0
        counted = engine.counters().get("udp_budgeted_dropped")
        for sender in senders:
            sender.close()
        engine.close()
        tun.close()
        listener.close()
    flood = ROUNDS * len(FLOODERS)
    windows = elapsed / loop.BUDGET_WINDOW + 2
    budget = loop.PRIORITY_PER_WINDOW if spoofing else loop.BUDGETED_PER_WINDOW
    # Before the load showed, batches were read in full; from then on, the budget per window.
    assert device.handshake_messages <= 2 * loop.BATCH + windows * budget
    assert spoofing or device.handshake_messages < flood // 4
    assert device.counters.drops[Drop.UNKNOWN_RECEIVER] == data_sent
    # Under load: no Diffie-Hellman without mac2, cookie replies and the rate limit instead.
    assert device.counters.cookie_replies_sent > 0
    assert device.counters.drops[Drop.NO_PEER] <= 2 * loop.BATCH
    assert counted == kernel_drops
    if spoofing:
        return  # the priority socket's buffer is large: the kernel need not drop yet
    assert kernel_drops > flood // 2  # the engine's counters (logged, and at its stop) tell it
