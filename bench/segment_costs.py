"""bench/segment_costs: where the engine's microseconds per 1,400-byte segment go, without I/O.

Two Devices, one handshake between them in memory, then a 64 KiB TSO packet (as TUN hands it
over with offloads) taken through each step of the data path in turn, each timed alone:
splitting it into MTU-size segments (`offload.split`), sealing them (`Device.send_packets`),
opening them on the other side (`Device.receive_datagrams`), and joining the decrypted segments
into one write (`offload.coalesce`); plus the bare ChaCha20-Poly1305 seal of one segment, the
floor any Python engine pays. The figures are per segment, best of --repeat. No root needed.

Usage: .venv/bin/python bench/segment_costs.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import struct
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from podwire.agent.engine import actions, device, offload

A, B = ("192.0.2.1", 51820), ("192.0.2.2", 51820)
MSS = 1368


def _pair() -> tuple[device.Device, device.Device]:
    clock = [100.0]
    a = device.Device(rng=os.urandom, wall_clock=lambda: 1.7e9 + clock[0])
    b = device.Device(rng=os.urandom, wall_clock=lambda: 1.7e9 + clock[0])
    a.set_private_key(os.urandom(32), now=clock[0])
    b.set_private_key(os.urandom(32), now=clock[0])
    assert a.public_key is not None and b.public_key is not None
    peer_b, peer_a = a.add_peer(b.public_key), b.add_peer(a.public_key)
    a.allowed_ips.insert("10.99.0.2/32", peer_b)
    b.allowed_ips.insert("10.99.0.1/32", peer_a)
    peer_b.endpoint = B
    # One handshake: a's first packet starts it, the keepalive after the response confirms it.
    pending: list[tuple[device.Device, actions.Action]] = [
        (a, x) for x in a.send_packet(_tcp(b"x" * 10), clock[0])
    ]
    while pending:
        origin, action = pending.pop(0)
        if isinstance(action, actions.SendDatagram):
            target, source = (b, A) if origin is a else (a, B)
            pending += [(target, x) for x in target.receive_datagram(action.data, source, 100.0)]
    return a, b


def _tcp(payload: bytes, *, seq: int = 1) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 8 << 4, 0x18, 500, 0, 0) + bytes(12)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, 6, 0,
        ipaddress.IPv4Address("10.99.0.1").packed, ipaddress.IPv4Address("10.99.0.2").packed,
    )  # fmt: skip
    return ip + tcp + payload


def _best(repeat: int, segments: int, step: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) / segments * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    a, b = _pair()
    big = _tcp(os.urandom(MSS * 47))
    vnet = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 52, MSS, 20, 16)
    segments = offload.split(vnet, big)
    n = len(segments)
    sealed: list[bytes] = []

    def seal() -> None:
        sealed.clear()
        for action in a.send_packets(segments, 100.0):
            assert isinstance(action, actions.SendDatagram)
            sealed.append(action.data)

    seal()
    opened: list[bytes] = []

    def open_all() -> None:
        # A fresh replay window each round: the same counters are opened again.
        keypair = b.peers[a.public_key or b""].current
        assert keypair is not None
        keypair.replay.__init__()  # type: ignore[misc]
        opened.clear()
        for action in b.receive_datagrams([(data, A) for data in sealed], 100.0):
            if isinstance(action, actions.DeliverPacket):
                opened.append(action.packet)

    open_all()
    assert len(opened) == n, (len(opened), n)
    aead = ChaCha20Poly1305(os.urandom(32))
    rows = {
        "split (TSO -> segments, checksums)": _best(args.repeat, n, lambda: offload.split(vnet, big)),
        "seal (Device.send_packets)": _best(args.repeat, n, seal),
        "  of which ChaCha20-Poly1305 alone": _best(
            args.repeat, n, lambda: [aead.encrypt(bytes(12), s, None) for s in segments]
        ),
        "open (Device.receive_datagrams)": _best(args.repeat, n, open_all),
        "coalesce (segments -> one write)": _best(args.repeat, n, lambda: offload.coalesce(opened)),
    }  # fmt: skip
    total = sum(v for k, v in rows.items() if not k.startswith(" "))
    print(f"{n} segments of {MSS} bytes from one 64 KiB TSO packet; microseconds per segment:")
    for name, us in rows.items():
        print(f"  {name:<40}{us:8.2f}")
    print(f"  {'Python total, both ends':<40}{total:8.2f}")
    send_us = rows["split (TSO -> segments, checksums)"] + rows["seal (Device.send_packets)"]
    receive_us = rows["open (Device.receive_datagrams)"] + rows["coalesce (segments -> one write)"]
    bound = MSS * 8 / max(send_us, receive_us) / 1e3
    print(
        f"  => Python alone bounds one stream at {bound:.2f} Gbit/s of payload (one core per end,"
    )
    print("     before any system call; the kernel's share comes on top)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
