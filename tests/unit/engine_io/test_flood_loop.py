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
from quiettun import QuietTun

from podwire.agent.engine import constants, cookie, ipc, loop, noise, udp
from podwire.agent.engine import device as device_mod
from podwire.agent.engine.counters import Drop

FLOODERS = [f"127.0.1.{i}" for i in range(1, 21)]
ROUNDS = 1000
DATA_EVERY = 50


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
    # When the loop first judges itself under load, and what it had read of handshakes then:
    # from that moment the budget holds (before it, a flood the loop keeps up with is read in
    # full, as a backlog-judged WireGuard reads it; how soon it shows depends on the machine).
    at_load: list[tuple[float, int, int]] = []
    judge_load = engine._on_handshake_backlog

    def on_load(now: float) -> None:
        if not at_load:
            drops = device.counters.drops[Drop.NO_PEER]
            at_load.append((time.monotonic(), device.handshake_messages, drops))
        judge_load(now)

    engine._on_handshake_backlog = on_load  # type: ignore[method-assign]
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
        ended = time.monotonic()
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
    assert at_load, "the flood was never judged as load"
    ((loaded_at, read_before_load, no_peer_before_load),) = at_load
    windows = (ended - loaded_at) / loop.BUDGET_WINDOW + 2
    budget = loop.PRIORITY_PER_WINDOW if spoofing else loop.BUDGETED_PER_WINDOW
    # From the moment the load showed, at most the budget per window (and one batch in flight).
    assert device.handshake_messages - read_before_load <= loop.BATCH + windows * budget
    assert spoofing or device.handshake_messages < flood // 4
    assert device.counters.drops[Drop.UNKNOWN_RECEIVER] == data_sent
    # Under load: no Diffie-Hellman without mac2, cookie replies and the rate limit instead.
    assert device.counters.cookie_replies_sent > 0
    # No Diffie-Hellman for the flood once the load showed (each NO_PEER drop cost one), but
    # for the batch in flight; before, as many as the loop read (a slow machine reads more).
    assert device.counters.drops[Drop.NO_PEER] - no_peer_before_load <= loop.BATCH
    assert counted == kernel_drops
    if spoofing:
        return  # the priority socket's buffer is large: the kernel need not drop yet
    assert kernel_drops > flood // 2  # the engine's counters (logged, and at its stop) tell it
