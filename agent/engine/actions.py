"""What the device asks of the I/O loop: the answer to every packet, datagram and tick.

The protocol core never touches a socket or the TUN device; the send and receive paths return
these, and the loop carries them out in order. Named tuples, not frozen dataclasses: one is
made for every packet, and a tuple is made in half the time.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

Endpoint: TypeAlias = tuple[str, int]


class SendDatagram(NamedTuple):
    data: bytes
    endpoint: Endpoint


class DeliverPacket(NamedTuple):
    """A decrypted IP packet for the TUN device."""

    packet: bytes


Action: TypeAlias = SendDatagram | DeliverPacket
