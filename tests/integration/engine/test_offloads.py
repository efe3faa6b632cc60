"""The engine's offloads with the real kernel: bulk TCP through the tunnel arrives whole both
ways (TSO split and sealed, UDP GSO trains, GRO, coalesced TUN writes), against the engine,
wireguard-go and an engine with its offloads off; and packets the kernel itself produced on a
TUN device with offloads (a USO datagram train, a TSO burst of a real TCP connection) are cut
into segments a receiver accepts.

ns a (engine)                          ns b (engine, wireguard-go, engine with offloads off)
10.99.0.1 ========== tunnel =========  10.99.0.2
192.0.2.1 --------- veth ----------    192.0.2.2
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pathlib
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import enginelog
import pytest

from podwire.agent.engine import offload
from podwire.agent.engine import tun as tun_mod
from podwire.agent.engine import udp as udp_mod
from podwire.sandbox import netns as netns_mod

# Each test runs on both fast paths, native and pure Python (conftest.fast_path).
pytestmark = pytest.mark.usefixtures("fast_path")

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
SIZE = 24 * 1024 * 1024
PORT = 7001
# Reads a whole TCP stream and prints its length and SHA-256.
SINK = (
    "import hashlib, socket, sys\n"
    "s = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
    "c, _ = s.accept(); h = hashlib.sha256(); n = 0\n"
    "while (b := c.recv(1 << 20)):\n"
    "    h.update(b); n += len(b)\n"
    "print(n, h.hexdigest(), flush=True)\n"
)
SOURCE = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)\n"
    "c.sendall(open(sys.argv[3], 'rb').read()); c.close()\n"
)


def _transfer(sender: Any, receiver: Any, data_file: pathlib.Path, digest: str) -> None:
    out = receiver.log.with_suffix(".sink")
    sink = receiver.netns.spawn(
        receiver.ns, [sys.executable, "-c", SINK, receiver.tunnel, str(PORT)], log_path=out
    )
    netns_mod.wait_until(
        lambda: f"{receiver.tunnel}:{PORT}" in receiver.ns.run("ss", "-tln").stdout,
        timeout=10,
        what="the sink to listen",
    )
    sender.ns.run(
        sys.executable, "-c", SOURCE, receiver.tunnel, str(PORT), str(data_file), timeout=120
    )
    sink.wait(60)
    assert out.read_text().split() == [str(SIZE), digest]


def _stopped_counters(side: Any) -> dict[str, Any]:
    side.stop()
    (stopping,) = enginelog.events(side.log, "engine_stopping")
    return stopping


@pytest.mark.parametrize("peer_kind", ["engine", "wireguard-go", "engine-offloads-off"])
def test_bulk_tcp_arrives_whole_both_ways(
    bed: Any, peer_kind: str, tmp_path: pathlib.Path, fast_path: str
) -> None:
    env = {"PODWIRE_ENGINE_OFFLOADS": "off"} if peer_kind == "engine-offloads-off" else {}
    w = bed.wire("engine", peer_kind.removesuffix("-offloads-off"), b_env=env)
    data_file = tmp_path / "data"
    data = os.urandom(SIZE)
    data_file.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    _transfer(w.a, w.b, data_file, digest)
    _transfer(w.b, w.a, data_file, digest)

    (started,) = enginelog.events(w.a.log, "engine_started")
    assert started["fast_path"] == fast_path
    assert {"vnet_hdr", "csum", "tso4", "udp_gso", "udp_gro", "tun_coalescing"} <= set(
        started["offloads"]
    )
    assert started["udp_receive_buffer"] >= 7 << 20
    a = _stopped_counters(w.a)
    assert a["tun_bad_offload"] == 0 and a["internal_error"] == 0
    assert a["tun_write_errors"] == 0 and a["udp_send_errors"] == 0
    # a's TSO bursts left as GSO trains; b's segments reached a's TUN joined.
    assert a["udp_gso_sends"] > 0
    assert a["tun_coalesced_writes"] > 0
    if peer_kind == "engine-offloads-off":
        (b_started,) = enginelog.events(w.b.log, "engine_started")
        # Steering is a socket feature, not an offload: it stays on with the offloads off.
        assert [o for o in b_started["offloads"] if o != "udp_steering"] == []
        assert b_started["fast_path"] == fast_path
        b = _stopped_counters(w.b)
        assert b["udp_gso_sends"] == 0 and b["tun_coalesced_writes"] == 0
        assert b["packets_delivered"] > SIZE // 1500


def _in_netns(ns: netns_mod.Netns, body: Callable[[], T]) -> T:
    """Runs body in a thread that has entered ns (setns changes only the calling thread)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with open(f"/run/netns/{ns.name}") as handle:
                if _LIBC.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            result.append(body())
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the body in the namespace did not finish"
    if errors:
        raise errors[0]
    return result[0]


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _valid(packet: bytes) -> bool:
    """The IPv4 header and transport checksums verify, as a receiving kernel checks them."""
    ihl = (packet[0] & 15) * 4
    proto = packet[9]
    pseudo = packet[12:20] + bytes([0, proto]) + (len(packet) - ihl).to_bytes(2, "big")
    return (
        int.from_bytes(packet[2:4], "big") == len(packet)
        and _sum(packet[:ihl]) == 0xFFFF
        and _sum(pseudo + packet[ihl:]) == 0xFFFF
    )


def _tun_up(ns: netns_mod.Netns) -> tun_mod.Tun:
    tun = tun_mod.Tun.create("pwoff0", mtu=1420)
    ns.ip("addr", "add", "10.77.0.1/24", "dev", "pwoff0")
    ns.ip("link", "set", "pwoff0", "up")
    return tun


def _read_raw(tun: tun_mod.Tun, want: Callable[[bytes, bytes], bool]) -> list[tuple[bytes, bytes]]:
    """(virtio_net_hdr, packet) reads until want(header, packet) holds for one."""
    reads = []
    while select.select([tun.fd], [], [], 5)[0]:
        data = os.read(tun.fd, tun_mod.READ_SIZE)
        reads.append((data[:10], data[10:]))
        if want(*reads[-1]):
            return reads
    raise AssertionError(f"the kernel did not send it; read {len(reads)} packets")


def test_a_uso_train_from_the_kernel_splits_into_valid_datagrams(netns: Any) -> None:
    ns = netns.namespace("o")
    payload = os.urandom(4 * 1000 + 333)

    def body() -> tuple[tun_mod.Tun, list[tuple[bytes, bytes]]]:
        tun = _tun_up(ns)
        try:
            assert tun.vnet_hdr and "uso4" in tun.offloads
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendmsg(
                    [payload],
                    [(udp_mod.SOL_UDP, udp_mod.UDP_SEGMENT, struct.pack("=H", 1000))],
                    0,
                    ("10.77.0.2", 9),
                )
                reads = _read_raw(tun, lambda h, p: len(p) > 1000)
        finally:
            tun.close()
        return tun, reads

    tun, reads = _in_netns(ns, body)
    header, packet = reads[-1]
    assert offload.VNET_HDR.unpack(header)[1] == offload.GSO_UDP_L4
    datagrams = offload.split(header, packet)
    assert [len(d) - 28 for d in datagrams] == [1000, 1000, 1000, 1000, 333]
    assert b"".join(d[28:] for d in datagrams) == payload
    assert all(_valid(d) for d in datagrams)
    assert tun.bad_offload == 0


def _syn_ack(syn: bytes, *, seq: int) -> bytes:
    """The answer of a peer at the SYN's destination: MSS 1380, window 64 KiB."""
    sport, dport, their_seq = struct.unpack("!HHI", syn[20:28])
    options = struct.pack("!BBH", 2, 4, 1380)
    tcp = bytearray(struct.pack("!HHIIBBHHH", dport, sport, seq, their_seq + 1, 6 << 4, 0x12,
                                65535, 0, 0) + options)  # fmt: skip
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                               syn[16:20], syn[12:16]))  # fmt: skip
    ip[10:12] = (~_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    pseudo = bytes(ip[12:20]) + bytes([0, 6]) + len(tcp).to_bytes(2, "big")
    tcp[16:18] = (~_sum(pseudo + bytes(tcp)) & 0xFFFF).to_bytes(2, "big")
    return bytes(ip + tcp)


def test_a_tso_burst_from_a_real_connection_splits_into_valid_segments(netns: Any) -> None:
    ns = netns.namespace("o")
    data = os.urandom(12 * 1380)

    def body() -> tuple[tun_mod.Tun, list[tuple[bytes, bytes]]]:
        tun = _tun_up(ns)
        try:
            assert "tso4" in tun.offloads
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                with contextlib.suppress(BlockingIOError):
                    client.connect(("10.77.0.2", 80))
                *_, (_, syn) = _read_raw(tun, lambda h, p: len(p) >= 40 and p[33] == 0x02)
                tun.write(_syn_ack(syn, seq=5000))
                _, writable, _ = select.select([], [client], [], 5)
                assert writable and not client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                # As much as the send buffer takes now; the initial window sends it in bursts.
                assert client.send(data) >= 2 * 1380
                reads = _read_raw(
                    tun, lambda h, p: offload.VNET_HDR.unpack(h)[1] == offload.GSO_TCPV4
                )
            finally:
                client.close()
        finally:
            tun.close()
        return tun, reads

    _, reads = _in_netns(ns, body)
    segments = [s for header, packet in reads for s in offload.split(header, packet)]
    carrying = [s for s in segments if len(s) > 40]
    gso_header, gso_packet = reads[-1]
    assert len(offload.split(gso_header, gso_packet)) > 1, "the kernel sent one TSO burst"
    assert all(_valid(s) for s in carrying)
    assert all(len(s) <= 1420 for s in carrying)
    joined = b"".join(s[20 + (s[32] >> 4) * 4 :] for s in carrying)
    assert joined == data[: len(joined)] and len(joined) >= 2 * 1380
    seqs = [int.from_bytes(s[24:28], "big") for s in carrying]
    assert seqs == sorted(seqs)
    ids = [int.from_bytes(s[4:6], "big") for s in carrying]
    assert len(set(ids)) == len(ids)


def test_udp_gso_and_gro_carry_a_train_whole(netns: Any) -> None:
    ns = netns.namespace("o")
    ns.ip("link", "set", "lo", "up")
    train = [os.urandom(1200) for _ in range(20)] + [os.urandom(500)]

    def body() -> tuple[udp_mod.UdpBind, udp_mod.UdpBind, list[tuple[bytes, Any]]]:
        sender, receiver = udp_mod.UdpBind.open(0), udp_mod.UdpBind.open(0)
        try:
            assert sender.gso and receiver.gro
            sender.send_batch([(d, ("127.0.0.1", receiver.port)) for d in train])
            got: list[tuple[bytes, Any]] = []
            while len(got) < len(train) and select.select(receiver.sockets, [], [], 5)[0]:
                got += receiver.receive_batch(receiver.sockets[0], 128)
        finally:
            sender.close()
            receiver.close()
        return sender, receiver, got

    sender, receiver, got = _in_netns(ns, body)
    assert [d for d, _ in got] == train
    assert {source for _, source in got} == {("127.0.0.1", sender.port)}
    assert sender.gso_sends == 1
    assert receiver.gro_receives >= 1
