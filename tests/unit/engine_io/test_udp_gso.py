"""UdpBind.send_batch: which datagrams go out as one GSO train, and what an EIO does.

The kernel here (6.x) segments in software when a device cannot checksum, so no real socket
gives the EIO that older kernels and wireguard-go meet; a socket double that refuses GSO with
EIO stands in for it. The trains' shapes are checked on the same double (real GSO trains are
tested in tests/integration/engine/test_offloads.py)."""

from __future__ import annotations

import errno
from typing import Any

from podwire.agent.engine import udp

PEER = ("192.0.2.2", 51820)
OTHER = ("192.0.2.3", 51820)


class Socket:
    """Records sendmsg trains and sendto datagrams; sendmsg fails with `fail` if set."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.trains: list[tuple[list[bytes], int, Any]] = []
        self.singles: list[tuple[bytes, Any]] = []

    def sendmsg(self, buffers: list[bytes], control: list[Any], flags: int, address: Any) -> int:
        if self.fail:
            raise OSError(self.fail, "refused")
        ((_, _, size),) = control
        self.trains.append((list(buffers), int.from_bytes(size, "little"), address))
        return sum(len(b) for b in buffers)

    def sendto(self, data: bytes, address: Any) -> int:
        self.singles.append((data, address))
        return len(data)

    def close(self) -> None:
        pass


def _bind(sock: Socket) -> udp.UdpBind:
    bind = udp.UdpBind([sock], 51820, dual_stack=False, offloads=False)  # type: ignore[list-item]
    bind.gso = True
    return bind


def test_runs_to_one_endpoint_of_one_size_go_as_trains() -> None:
    sock = Socket()
    bind = _bind(sock)
    big, short = b"x" * 1000, b"y" * 400
    batch = [(big, PEER)] * 3 + [(short, PEER), (big, PEER), (big, OTHER), (short, OTHER)]
    batch += [(big, PEER)] * 100

    bind.send_batch(batch)

    shapes = [([len(b) for b in buffers], size, address) for buffers, size, address in sock.trains]
    assert shapes == [
        ([1000, 1000, 1000, 400], 1000, PEER),  # a shorter one ends a train
        ([1000, 400], 1000, OTHER),
        ([1000] * 64, 1000, PEER),  # at most 64 datagrams a train
        ([1000] * 36, 1000, PEER),
    ]
    assert sock.singles == [(big, PEER)]  # alone before the endpoint changes
    sent = [b for buffers, _, _ in sock.trains for b in buffers] + [d for d, _ in sock.singles]
    assert sorted(map(len, sent)) == sorted(len(d) for d, _ in batch)
    for buffers, size, _ in sock.trains:
        assert len(buffers) <= udp.GSO_MAX_SEGMENTS
        assert sum(map(len, buffers)) <= udp.GSO_MAX_BYTES
        assert all(len(b) == size for b in buffers[:-1]) and len(buffers[-1]) <= size
    assert bind.gso_sends == len(sock.trains)


def test_an_eio_turns_gso_off_for_good_and_the_train_goes_singly() -> None:
    sock = Socket(fail=errno.EIO)
    bind = _bind(sock)
    train = [(bytes([i]) * 1000, PEER) for i in range(5)]

    bind.send_batch(train)
    bind.send_batch(train)

    assert not bind.gso and "EIO" in bind.gso_off_reason
    assert [d for d, _ in sock.singles] == [d for d, _ in train] * 2
    assert bind.send_errors == 0 and bind.gso_sends == 0


def test_another_error_drops_the_train_and_keeps_gso() -> None:
    sock = Socket(fail=errno.ENOBUFS)
    bind = _bind(sock)
    bind.send_batch([(b"z" * 1000, PEER)] * 4)
    assert bind.gso and bind.send_errors == 4 and not sock.singles
