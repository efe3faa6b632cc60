"""The cross-platform WireGuard configuration protocol (https://www.wireguard.com/xplatform/).

`wg` talks to a userspace WireGuard over a unix socket with `get=1` and `set=1` requests made of
`key=value` lines and ended by a blank line; every answer ends with `errno=N` and a blank line.
This module is the protocol without the socket: parse_request() turns the bytes of one request
into typed operations (or raises UapiError, and nothing else), apply_set() applies a parsed set
to a Device, and serialize_get() writes a Device's state the way `wg show` and `wg showconf`
read it. The socket server lives in ipc.py.

A set is parsed and validated completely before anything is applied, so a malformed request
changes nothing (wireguard-go applies the lines before the bad one).

One extension of podwire-engine's own, for key rotation (wireguard-go has none): a peer section
may go on, right after its `public_key=OLD` line, with `rename_to=NEW`. The peer OLD takes the
key NEW in place, keeping its sessions, endpoint, counters and allowed-ips, and initiates a
handshake with NEW at once; the rest of the section applies to it. An unknown OLD makes the
section one for NEW, as if it began `public_key=NEW`. A set that would rename onto a key that
a peer (or the device itself) already holds fails with EEXIST before anything is applied.
`get` prints nothing new, so `wg` reads the engine as ever.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import ipaddress
import re
from typing import TYPE_CHECKING

from podwire.agent.engine import constants, noise
from podwire.agent.engine.actions import Endpoint

if TYPE_CHECKING:
    from podwire.agent.engine import device as device_mod

# The protocol's version of the peer configuration; the only one there is.
PROTOCOL_VERSION = 1

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_PREFIX_LEN = re.compile(r"[0-9]{1,3}")
_ZERO_KEY = bytes(constants.KEY_LEN)


class UapiError(Exception):
    """A request the engine cannot carry out; `errno` is what the answer reports to `wg`."""

    def __init__(self, message: str, *, errno: int = errno_mod.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


@dataclasses.dataclass(frozen=True)
class GetRequest:
    """`get=1`: the device's configuration and the peers' statistics."""


@dataclasses.dataclass(frozen=True)
class PeerChange:
    """One `public_key=` section of a set, with every key that followed it."""

    public_key: bytes
    # `rename_to=` (podwire-engine's extension): the key the peer `public_key` takes.
    rename_to: bytes | None = None
    remove: bool = False
    update_only: bool = False
    # A key of 32 zero bytes removes the pre-shared key. Never in a repr, so never in a log.
    preshared_key: bytes | None = dataclasses.field(default=None, repr=False)
    endpoint: Endpoint | None = None
    persistent_keepalive_interval: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[IPNetwork, ...] = ()
    # `allowed_ip=-prefix` (newer `wg`): take this one prefix from the peer.
    removed_allowed_ips: tuple[IPNetwork, ...] = ()


@dataclasses.dataclass(frozen=True)
class SetRequest:
    """`set=1`: device keys first, then one PeerChange per `public_key=` section, in order."""

    # A key of 32 zero bytes removes the private key. Never in a repr, so never in a log.
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: tuple[PeerChange, ...] = ()


Request = GetRequest | SetRequest


def parse_request(data: bytes) -> Request:
    """Parses one request: its first line names the operation, a blank line may end it."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError("request is not ASCII") from None
    if text.endswith("\n\n"):
        text = text[:-1]
    if not text.endswith("\n"):
        raise UapiError("request does not end with a newline")
    lines = text[:-1].split("\n")
    operation, body = lines[0], lines[1:]
    if operation == "get=1":
        if body:
            raise UapiError("get=1 takes no keys")
        return GetRequest()
    if operation == "set=1":
        return _parse_set(body)
    raise UapiError(f"unknown operation {operation[:40]!r}")


def _parse_set(lines: list[str]) -> SetRequest:
    device = SetRequest()
    peers: list[PeerChange] = []
    draft: _PeerDraft | None = None
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"line {line[:40]!r} is not key=value")
        if key == "public_key":
            if draft is not None:
                peers.append(draft.finish())
            draft = _PeerDraft(_parse_key(key, value))
        elif draft is None:
            device = _parse_device_line(device, key, value)
        else:
            draft.parse_line(key, value)
    if draft is not None:
        peers.append(draft.finish())
    return dataclasses.replace(device, peers=tuple(peers))


def _parse_device_line(device: SetRequest, key: str, value: str) -> SetRequest:
    if key == "private_key":
        return dataclasses.replace(device, private_key=_parse_key(key, value))
    if key == "listen_port":
        return dataclasses.replace(device, listen_port=_parse_int(key, value, 0xFFFF))
    if key == "fwmark":
        # An empty value, like 0, removes the mark.
        mark = _parse_int(key, value, 0xFFFFFFFF) if value else 0
        return dataclasses.replace(device, fwmark=mark)
    if key == "replace_peers":
        return dataclasses.replace(device, replace_peers=_parse_true(key, value))
    raise UapiError(f"unknown device key {key[:40]!r}")


class _PeerDraft:
    """A PeerChange while its section is being read."""

    def __init__(self, public_key: bytes) -> None:
        self.change = PeerChange(public_key)
        self.lines = 0  # read after public_key
        self.allowed_ips: list[IPNetwork] = []
        self.removed_allowed_ips: list[IPNetwork] = []

    def parse_line(self, key: str, value: str) -> None:
        self.lines += 1
        if key == "rename_to":
            if self.lines != 1:
                raise UapiError("rename_to must come right after its public_key")
            self._set(rename_to=_parse_key(key, value))
        elif key == "allowed_ip":
            if value.startswith("-"):
                self.removed_allowed_ips.append(parse_prefix(value[1:]))
            else:
                self.allowed_ips.append(parse_prefix(value))
        elif key == "replace_allowed_ips":
            # Lines apply in order: the allowed IPs given before this line go as well.
            self._set(replace_allowed_ips=_parse_true(key, value))
            self.allowed_ips.clear()
            self.removed_allowed_ips.clear()
        elif key in ("remove", "update_only"):
            self._set(**{key: _parse_true(key, value)})
        elif key == "preshared_key":
            self._set(preshared_key=_parse_key(key, value))
        elif key == "endpoint":
            self._set(endpoint=parse_endpoint(value))
        elif key == "persistent_keepalive_interval":
            self._set(persistent_keepalive_interval=_parse_int(key, value, 0xFFFF))
        elif key == "protocol_version":
            if value != str(PROTOCOL_VERSION):
                raise UapiError(f"protocol_version {value[:20]!r} is not supported")
        else:
            raise UapiError(f"unknown peer key {key[:40]!r}")

    def _set(self, **fields: object) -> None:
        self.change = dataclasses.replace(self.change, **fields)  # type: ignore[arg-type]

    def finish(self) -> PeerChange:
        return dataclasses.replace(
            self.change,
            allowed_ips=tuple(self.allowed_ips),
            removed_allowed_ips=tuple(self.removed_allowed_ips),
        )


def _parse_key(name: str, value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise UapiError(f"{name} is not {constants.KEY_LEN} bytes of hex")
    return bytes.fromhex(value)


def _parse_int(name: str, value: str, maximum: int) -> int:
    if not _DECIMAL.fullmatch(value) or int(value) > maximum:
        raise UapiError(f"{name} {value[:20]!r} is not a number from 0 to {maximum}")
    return int(value)


def _parse_true(name: str, value: str) -> bool:
    if value != "true":
        raise UapiError(f"{name} takes only the value true, not {value[:20]!r}")
    return True


def parse_endpoint(value: str) -> Endpoint:
    """`a.b.c.d:port` or `[v6]:port`; an IPv4-mapped IPv6 address becomes plain IPv4."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not _DECIMAL.fullmatch(port_text) or int(port_text) > 0xFFFF:
        raise UapiError(f"endpoint {value[:60]!r} is not address:port")
    try:
        if host.startswith("[") and host.endswith("]"):
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                host[1:-1]
            )
            if address.ipv4_mapped is not None:  # type: ignore[union-attr]
                address = address.ipv4_mapped  # type: ignore[union-attr]
        else:
            address = ipaddress.IPv4Address(host)
    except ValueError:
        raise UapiError(f"endpoint {value[:60]!r} has no valid IP address") from None
    return (str(address), int(port_text))


def parse_prefix(value: str) -> IPNetwork:
    """`addr/len`; host bits past the prefix length are cleared, as the kernel does."""
    address, sep, length = value.partition("/")
    if not sep or not _PREFIX_LEN.fullmatch(length):
        raise UapiError(f"allowed_ip {value[:60]!r} is not address/prefix-length")
    try:
        return ipaddress.ip_network(f"{address}/{int(length)}", strict=False)
    except ValueError:
        raise UapiError(f"allowed_ip {value[:60]!r} is not a valid prefix") from None


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_response(*, errno: int, body: str = "") -> bytes:
    """The answer to a request: a get's lines (if any), then errno and the blank line."""
    return f"{body}errno={errno}\n\n".encode("ascii")


def serialize_get(device: device_mod.Device) -> str:
    """The device's configuration and statistics as `key=value` lines, in `wg`'s order."""
    lines: list[str] = []
    if device.private_key is not None:
        lines.append(f"private_key={device.private_key.hex()}")
    if device.listen_port:
        lines.append(f"listen_port={device.listen_port}")
    if device.fwmark:
        lines.append(f"fwmark={device.fwmark}")
    for peer in device.peers.values():
        lines.extend(_peer_lines(device, peer))
    return "".join(line + "\n" for line in lines)


def _peer_lines(device: device_mod.Device, peer: device_mod.Peer) -> list[str]:
    handshake = peer.last_handshake_wall
    seconds, nanoseconds = (0, 0) if handshake is None else _split_time(handshake)
    lines = [
        f"public_key={peer.public_key.hex()}",
        f"preshared_key={(peer.preshared_key or _ZERO_KEY).hex()}",
        f"protocol_version={PROTOCOL_VERSION}",
    ]
    if peer.endpoint is not None:
        lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
    lines += [
        f"last_handshake_time_sec={seconds}",
        f"last_handshake_time_nsec={nanoseconds}",
        f"tx_bytes={peer.tx_bytes}",
        f"rx_bytes={peer.rx_bytes}",
        f"persistent_keepalive_interval={peer.persistent_keepalive_interval}",
    ]
    lines += [f"allowed_ip={prefix}" for prefix in _allowed_ips(device, peer)]
    return lines


def _split_time(wall: float) -> tuple[int, int]:
    # Splitting before scaling keeps the nanoseconds as exact as the float allows.
    seconds = int(wall)
    return seconds, min(round((wall - seconds) * 1e9), 999_999_999)


def _allowed_ips(device: device_mod.Device, peer: device_mod.Peer) -> list[IPNetwork]:
    return [ipaddress.ip_network(entry) for entry in device.allowed_ips.entries_for_peer(peer)]


def apply_set(
    device: device_mod.Device, request: SetRequest, *, now: float
) -> list[tuple[bytes, bytes]]:
    """Applies a parsed set to the device, in the order of its lines, at monotonic `now`
    (when a replaced private key's grace starts). Returns the renames done, (old, new).

    The caller rebinds the UDP socket when listen_port or fwmark changed; apply_set only
    records them on the device.
    """
    _check_renames(device, request)
    if request.private_key is not None:
        device.set_private_key(request.private_key, now=now)
    if request.listen_port is not None:
        device.listen_port = request.listen_port
    if request.fwmark is not None:
        device.fwmark = request.fwmark
    if request.replace_peers:
        device.remove_all_peers()
    renames: list[tuple[bytes, bytes]] = []
    for change in request.peers:
        _apply_peer(device, change, renames)
    return renames


def _check_renames(device: device_mod.Device, request: SetRequest) -> None:
    """Refuses, before anything is applied, a set that renames a peer onto a key that a peer
    or the device holds by then: it walks the sections over the set of keys they leave."""
    if all(change.rename_to is None for change in request.peers):
        return
    own = _own_key_after(device, request)
    keys = set() if request.replace_peers else set(device.peers) - {own}
    for change in request.peers:
        key = change.public_key
        if key == own:
            continue  # ignored, as every section for our own key is
        if change.rename_to is not None and change.rename_to != key and key in keys:
            if change.rename_to in keys or change.rename_to == own:
                raise UapiError(
                    f"cannot rename peer {_short(key)} to {_short(change.rename_to)}: "
                    "that key is taken",
                    errno=errno_mod.EEXIST,
                )
            keys.discard(key)
            keys.add(change.rename_to)  # renamed, it exists whatever update_only says
        key = change.rename_to or key
        if change.remove:
            keys.discard(key)
        elif not change.update_only and key != own:
            keys.add(key)


def _own_key_after(device: device_mod.Device, request: SetRequest) -> bytes | None:
    if request.private_key is None:
        return device.public_key
    if request.private_key == _ZERO_KEY:
        return None
    return noise.public_key(request.private_key)


def _short(key: bytes) -> str:
    return key.hex()[:8] + "…"


def _apply_peer(
    device: device_mod.Device, change: PeerChange, renames: list[tuple[bytes, bytes]]
) -> None:
    # A section for the device's own public key is ignored, as wireguard-go does.
    if change.public_key == device.public_key:
        return
    if change.rename_to is not None and change.rename_to != change.public_key:
        if device.rename_peer(change.public_key, change.rename_to) is not None:
            renames.append((change.public_key, change.rename_to))
        change = dataclasses.replace(change, public_key=change.rename_to)
        if change.public_key == device.public_key:
            return
    peer = device.peers.get(change.public_key)
    if change.remove:
        if peer is not None:
            device.remove_peer(change.public_key)
        return
    if peer is None:
        if change.update_only:
            return
        peer = device.add_peer(change.public_key)
    if change.preshared_key is not None:
        peer.preshared_key = change.preshared_key
    if change.endpoint is not None:
        peer.endpoint = change.endpoint
    if change.persistent_keepalive_interval is not None:
        peer.persistent_keepalive_interval = change.persistent_keepalive_interval
    if change.replace_allowed_ips:
        device.allowed_ips.remove_by_peer(peer)
    if change.removed_allowed_ips:
        _remove_allowed_ips(device, peer, set(change.removed_allowed_ips))
    for prefix in change.allowed_ips:
        device.allowed_ips.insert(prefix, peer)


def _remove_allowed_ips(
    device: device_mod.Device, peer: device_mod.Peer, gone: set[IPNetwork]
) -> None:
    keep = [prefix for prefix in _allowed_ips(device, peer) if prefix not in gone]
    device.allowed_ips.remove_by_peer(peer)
    for prefix in keep:
        device.allowed_ips.insert(prefix, peer)
