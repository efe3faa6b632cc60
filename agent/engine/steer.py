"""Steering in the kernel: which of the listen port's sockets a datagram lands on.

Under a handshake flood, every datagram the engine's one Python thread reads costs it a few
microseconds before it can tell flood from data, so a flood of a few hundred thousand
initiations a second takes the core the data needs. The kernel can tell them apart for
nothing: the port's sockets form a SO_REUSEPORT group, and a classic BPF program
(SO_ATTACH_REUSEPORT_CBPF) picks the socket for each datagram by its first word and its
source address (read from the network header through SKF_NET_OFF):

- transport data (type 4) goes to the DATA socket;
- handshake messages (types 1 to 3) from a peer's configured endpoint go to the PRIORITY one;
- everything else (handshakes from unknown sources: a flood, a roaming peer; junk too short or
  of no known type) goes to the BUDGETED socket, whose small buffer the kernel lets overflow
  while the loop reads it only within a budget.

The program's return value is the socket's place in the group (the order of binding), which
is why the roles are numbers. A load past the datagram's end ends the program with 0, so junk
lands on the BUDGETED socket too. The program is rebuilt whenever the peers' endpoints change.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable

from podwire.agent.engine import constants

SO_ATTACH_REUSEPORT_CBPF = 51
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8
SK_MEMINFO_VARS = 9

# The sockets' places in the reuseport group: the order in which they are bound.
BUDGETED = 0
DATA = 1
PRIORITY = 2
ROLES = (BUDGETED, DATA, PRIORITY)

# The kernel's limit on a classic program's length (BPF_MAXINSNS).
MAX_INSTRUCTIONS = 4096

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
_LD_W_ABS = 0x20
_LD_B_ABS = 0x30
_LD_MEM = 0x60
_ST = 0x02
_ALU_AND_K = 0x54
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_RET_K = 0x06
_SKF_NET_OFF = -0x100000 & 0xFFFFFFFF

_INSN = struct.Struct("=HBBI")
# The first word of each message type, as the program loads it (network order).
_WORD = {kind: kind << 24 for kind in range(1, 5)}
_HANDSHAKE_TYPES = (
    constants.MESSAGE_INITIATION,
    constants.MESSAGE_RESPONSE,
    constants.MESSAGE_COOKIE_REPLY,
)

Instruction = tuple[int, int, int, int]
# The program's length: the type checks (7), the version check (4), each block's load(s) and
# final return (2 and 9), and per address 2 (IPv4) or 9 (IPv6) instructions.
_FIXED_INSTRUCTIONS = 7 + 4 + 2 + 9
_PER_V4 = 2
_PER_V6 = 9


class SteerError(OSError):
    """The kernel refused the program; the engine falls back to one socket."""


def _net(offset: int) -> int:
    return (_SKF_NET_OFF + offset) & 0xFFFFFFFF


def program(v4: Iterable[bytes], v6: Iterable[bytes]) -> list[Instruction]:
    """The program for sources v4 (4-byte addresses) and v6 (16-byte) as peers' endpoints.

    Addresses that would take it past MAX_INSTRUCTIONS are left out (their handshakes take
    the budgeted path); `fitting` says how many fit.
    """
    v4, v6 = fitting(sorted(set(v4)), sorted(set(v6)))
    head: list[Instruction] = [
        (_LD_W_ABS, 0, 0, 0),
        (_JMP_JEQ_K, 0, 1, _WORD[constants.MESSAGE_TRANSPORT]),
        (_RET_K, 0, 0, DATA),
    ]
    for kind in _HANDSHAKE_TYPES:
        head.append((_JMP_JEQ_K, len(_HANDSHAKE_TYPES) - len(head) + 3, 0, _WORD[kind]))
    head.append((_RET_K, 0, 0, BUDGETED))
    ipv4 = _ipv4_block(v4)
    ipv6 = _ipv6_block(v6)
    version = [
        (_LD_B_ABS, 0, 0, _net(0)),
        (_ALU_AND_K, 0, 0, 0xF0),
        (_JMP_JEQ_K, 0, 1, 0x60),
        (_JMP_JA, 0, 0, len(ipv4)),
    ]
    return head + version + ipv4 + ipv6


def fitting(v4: list[bytes], v6: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """As many of the addresses as fit in one program, IPv4 first (each costs 2 instructions,
    an IPv6 address 9)."""
    room = MAX_INSTRUCTIONS - _FIXED_INSTRUCTIONS
    v4 = v4[: room // _PER_V4]
    room -= _PER_V4 * len(v4)
    return v4, v6[: room // _PER_V6]


def _ipv4_block(addresses: list[bytes]) -> list[Instruction]:
    block: list[Instruction] = [(_LD_W_ABS, 0, 0, _net(12))]
    for address in addresses:
        # A match falls through to its return; a miss jumps over it.
        block += [(_JMP_JEQ_K, 0, 1, int.from_bytes(address, "big")), (_RET_K, 0, 0, PRIORITY)]
    return [*block, (_RET_K, 0, 0, BUDGETED)]


def _ipv6_block(addresses: list[bytes]) -> list[Instruction]:
    # The source's four words in scratch memory, then each address word by word.
    block: list[Instruction] = []
    for i in range(4):
        block += [(_LD_W_ABS, 0, 0, _net(8 + 4 * i)), (_ST, 0, 0, i)]
    for address in addresses:
        for i in range(4):
            word = int.from_bytes(address[4 * i : 4 * i + 4], "big")
            block += [(_LD_MEM, 0, 0, i), (_JMP_JEQ_K, 0, 7 - 2 * i, word)]
        block.append((_RET_K, 0, 0, PRIORITY))
    return [*block, (_RET_K, 0, 0, BUDGETED)]


def sources(hosts: Iterable[str]) -> tuple[list[bytes], list[bytes]]:
    """Endpoint hosts as the program's IPv4 and IPv6 addresses; an IPv4-mapped IPv6 address
    is its IPv4 address (the datagram's header is IPv4); a name that is no address is left out."""
    v4: list[bytes] = []
    v6: list[bytes] = []
    for host in hosts:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                v6.append(address.packed)
                continue
            address = mapped
        v4.append(address.packed)
    return v4, v6


def attach(sock: socket.socket, instructions: list[Instruction]) -> None:
    """Makes the program the group's (any member's socket will do); raises SteerError."""
    code = b"".join(_INSN.pack(*insn) for insn in instructions)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, natively aligned.
    fprog = struct.pack("@HP", len(instructions), ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        raise SteerError(
            exc.errno, f"the kernel refused the steering program: {exc.strerror}"
        ) from None


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for this socket (its buffer full); None if unknown."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:
        return None
    return int(struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0])
