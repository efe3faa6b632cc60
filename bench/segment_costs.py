"""bench/segment_costs: where the engine's microseconds per 1,400-byte segment go, without I/O.

Two Devices, one handshake between them in memory, then a 64 KiB TSO packet (as TUN hands it
over with offloads) taken through each step of the data path in turn, each timed alone:
splitting it into MTU-size segments (`offload.split`), sealing them (`Device.send_packets`),
opening them on the other side (`Device.receive_datagrams`), and joining the decrypted segments
into one write (`fastpath.coalesce`); plus the bare seal of the segments (fastpath.seal), the floor of
the path. The figures are per segment, best of --repeat, for each fast
path (fastpath.py: the C extension, then pure Python) in one run. No root needed.

Usage: .venv/bin/python bench/segment_costs.py [--repeat 20] [--path native|python|both]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import struct
import sys
import time
from collections.abc import Callable

from podwire.agent.engine import actions, device, fastpath, offload

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


def measure(repeat: int) -> dict[str, float]:
    """Microseconds per segment of each step, on the fast path in force."""
    a, b = _pair()
    big = _tcp(os.urandom(MSS * 47))
    vnet = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 52, MSS, 20, 16)
    segments = fastpath.split(vnet, big)
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
    cipher = fastpath.cipher(os.urandom(32))
    # A bare ACK as TUN hands it over alone, its checksum left partial (not in the totals).
    ack = _tcp(b"")
    ack_vnet = offload.VNET_HDR.pack(offload.F_NEEDS_CSUM, offload.GSO_NONE, 0, 0, 20, 16)
    return {
        "split (TSO -> segments, checksums)": _best(repeat, n, lambda: fastpath.split(vnet, big)),
        "seal (Device.send_packets)": _best(repeat, n, seal),
        "  of which fastpath.seal alone": _best(
            repeat, n, lambda: fastpath.seal(cipher, 1, 0, segments, 1420)
        ),
        "open (Device.receive_datagrams)": _best(repeat, n, open_all),
        "coalesce (segments -> one write)": _best(repeat, n, lambda: fastpath.coalesce(opened)),
        "  an ACK's partial checksum completed": _best(
            repeat, n, lambda: [fastpath.split(ack_vnet, ack) for _ in range(n)]
        ),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--path", choices=("native", "python", "both"), default="both")
    args = p.parse_args()
    natives = {"native": [True], "python": [False], "both": [True, False]}[args.path]
    if True in natives and not fastpath.native_available():
        print(f"the native fast path is not built: {fastpath.unavailable_reason}")
        return 1
    columns = {}
    for native in natives:
        fastpath.select(native)
        columns[fastpath.name] = measure(args.repeat)
    print(f"47 segments of {MSS} bytes from one 64 KiB TSO packet; microseconds per segment:")
    print(f"  {'':<40}" + "".join(f"{name:>18}" for name in columns))
    steps = next(iter(columns.values()))
    for step in steps:
        print(f"  {step:<40}" + "".join(f"{c[step]:18.2f}" for c in columns.values()))
    totals, bounds = [], []
    for rows in columns.values():
        totals.append(sum(v for k, v in rows.items() if not k.startswith(" ")))
        send_us = rows["split (TSO -> segments, checksums)"] + rows["seal (Device.send_packets)"]
        receive_us = (
            rows["open (Device.receive_datagrams)"] + rows["coalesce (segments -> one write)"]
        )
        bounds.append(MSS * 8 / max(send_us, receive_us) / 1e3)
    print(f"  {'total, both ends':<40}" + "".join(f"{t:18.2f}" for t in totals))
    print(f"  {'=> bound on one stream, Gbit/s':<40}" + "".join(f"{b:18.2f}" for b in bounds))
    print("     (payload, one core per end, before any system call; the kernel's share on top)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
