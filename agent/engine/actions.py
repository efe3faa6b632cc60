"""What the device asks of the I/O loop: the answer to every packet, datagram and tick.

The protocol core never touches a socket or the TUN device; the send and receive paths return
these, and the loop carries them out in order.
"""

from __future__ import annotations

import dataclasses
from typing import TypeAlias

Endpoint: TypeAlias = tuple[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class SendDatagram:
    data: bytes
    endpoint: Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class DeliverPacket:
    """A decrypted IP packet for the TUN device."""

    packet: bytes


Action: TypeAlias = SendDatagram | DeliverPacket
