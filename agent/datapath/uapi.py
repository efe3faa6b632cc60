"""A client for the cross-platform WireGuard UAPI, spoken exactly as `wg` speaks it.

A userspace WireGuard (podwire-engine, wireguard-go) serves `get=1` and `set=1` requests on
/var/run/wireguard/<device>.sock: lines of `key=value`, keys in hex, ending with a blank line;
the answer ends with `errno=N` and a blank line. Speaking the same protocol as `wg` means the
agent configures either engine the same way, and `wg show` reads back what the agent wrote.

The device's private key is read only to tell whether one is set and to derive the public key:
it is never handed to callers, never put in an error and never logged. Errors are `UapiError`,
carrying the errno and what was asked (the fields, never their values).

The parsing and formatting are pure functions, tested on recorded text without a socket.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import json
import os
import pathlib
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import Final

from podwire.agent import keys, wgdevice

SOCKET_DIR: Final = pathlib.Path("/var/run/wireguard")
DEFAULT_TIMEOUT: Final = 5.0
# A get for thousands of peers is a few megabytes; a reply past this is not a UAPI reply.
_MAX_REPLY: Final = 256 * 1024 * 1024
# The engine's features file is a few hundred bytes; past this it is not one.
_MAX_FEATURES: Final = 64 * 1024
ENGINE_FEATURES_UNKNOWN: Final = ("engine:unknown",)


class UapiError(Exception):
    """A UAPI request failed: `errno` is the engine's or the socket's, `operation` what was asked."""

    def __init__(self, device: str, operation: str, errno: int, detail: str = "") -> None:
        reason = detail or os.strerror(errno)
        super().__init__(f"wireguard device {device}: {operation} failed (errno {errno}: {reason})")
        self.device = device
        self.operation = operation
        self.errno = errno


def format_set_request(
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
    replace_peers: bool = False,
    peers: Sequence[wgdevice.PeerChange] = (),
) -> str:
    """The text of one `set=1` request, blank line included."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={_hex(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    if replace_peers:
        lines.append("replace_peers=true")
    for peer in peers:
        lines.extend(_peer_lines(peer))
    return "\n".join(lines) + "\n\n"


def _peer_lines(peer: wgdevice.PeerChange) -> list[str]:
    public = _hex(keys.decode_key(peer.public_key))
    if peer.renamed_from is not None and peer.renamed_from != peer.public_key:
        # podwire-engine's extension (see podwire.agent.engine.uapi): the peer of the old key
        # takes the new one in place, keeping its sessions; the lines below apply to it.
        old = _hex(keys.decode_key(peer.renamed_from))
        lines = [f"public_key={old}", f"rename_to={public}"]
    else:
        lines = [f"public_key={public}"]
    if peer.remove:
        return [*lines, "remove=true"]
    if peer.update_only:
        lines.append("update_only=true")
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}")
    if peer.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
    if peer.replace_allowed_ips:
        lines.append("replace_allowed_ips=true")
    lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return lines


def parse_get_response(text: str) -> tuple[wgdevice.Device, int]:
    """The device state and errno of a `get=1` answer (the blank line may be left off)."""
    private: bytes | None = None
    listen_port = fwmark = 0
    peers: list[wgdevice.Peer] = []
    peer: dict[str, object] | None = None
    errno = 0
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"UAPI line without '=': {key[:40]!r}")
        if key == "errno":
            errno = int(value)
        elif key == "public_key":
            if peer is not None:
                peers.append(_finish_peer(peer))
            peer = {"public_key": keys.encode_key(bytes.fromhex(value)), "allowed_ips": []}
        elif peer is None:
            if key == "private_key":
                private = bytes.fromhex(value)
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "fwmark":
                fwmark = int(value)
        else:
            _peer_field(peer, key, value)
    if peer is not None:
        peers.append(_finish_peer(peer))
    has_key = private is not None and any(private)
    state = wgdevice.Device(
        has_private_key=has_key,
        public_key=keys.encode_key(keys.public_key_of(private)) if has_key and private else None,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(peers),
    )
    return state, errno


def _peer_field(peer: dict[str, object], key: str, value: str) -> None:
    if key == "endpoint":
        peer["endpoint"] = wgdevice.parse_endpoint(value)
    elif key == "allowed_ip":
        allowed = peer["allowed_ips"]
        assert isinstance(allowed, list)
        allowed.append(ipaddress.ip_network(value, strict=False))
    elif key in {"last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes"}:
        peer[key] = int(value)
    elif key == "persistent_keepalive_interval":
        peer["persistent_keepalive"] = int(value)
    elif key == "preshared_key":
        peer["has_preshared_key"] = any(bytes.fromhex(value))
    # protocol_version and keys a newer engine adds are not ours to interpret.


def _finish_peer(peer: dict[str, object]) -> wgdevice.Peer:
    sec = _int(peer.get("last_handshake_time_sec"))
    nsec = _int(peer.get("last_handshake_time_nsec"))
    endpoint = peer.get("endpoint")
    allowed = peer["allowed_ips"]
    assert isinstance(allowed, list)
    return wgdevice.Peer(
        public_key=str(peer["public_key"]),
        endpoint=endpoint if isinstance(endpoint, wgdevice.Endpoint) else None,
        allowed_ips=tuple(allowed),
        last_handshake=sec + nsec / 1e9 if sec or nsec else None,
        rx_bytes=_int(peer.get("rx_bytes")),
        tx_bytes=_int(peer.get("tx_bytes")),
        persistent_keepalive=_int(peer.get("persistent_keepalive")),
        has_preshared_key=bool(peer.get("has_preshared_key")),
    )


def parse_engine_features(text: bytes) -> tuple[str, ...]:
    """The features file's {"fast_path": name, "offloads": [names]} as `engine:<name>`s."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return ENGINE_FEATURES_UNKNOWN
    if not isinstance(data, dict):
        return ENGINE_FEATURES_UNKNOWN
    fast_path, offloads = data.get("fast_path"), data.get("offloads")
    if not isinstance(offloads, list):
        return ENGINE_FEATURES_UNKNOWN
    names = [fast_path, *offloads]
    if not all(isinstance(n, str) and n.isidentifier() and n.isascii() for n in names):
        return ENGINE_FEATURES_UNKNOWN
    return tuple(f"engine:{name}" for name in names)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _hex(raw: bytes) -> str:
    if len(raw) != keys.KEY_LEN:
        raise ValueError(f"a WireGuard key is {keys.KEY_LEN} bytes, got {len(raw)}")
    return raw.hex()


class UapiClient:
    """One device's UAPI socket; each call is one connection, as `wg` makes."""

    def __init__(
        self,
        device: str,
        *,
        socket_dir: pathlib.Path = SOCKET_DIR,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.device = device
        self.path = socket_dir / f"{device}.sock"
        self.features_path = socket_dir / f"{device}.features"
        self.timeout = timeout

    def engine_features(self) -> tuple[str, ...]:
        """What the engine says it has in force (podwire-engine's <device>.features), as
        `engine:<name>`; `engine:unknown` when it says nothing readable (an older engine,
        wireguard-go, a file cut short)."""
        try:
            with self.features_path.open("rb") as handle:
                text = handle.read(_MAX_FEATURES)
        except OSError:
            return ENGINE_FEATURES_UNKNOWN
        return parse_engine_features(text)

    def engine_pid(self) -> int | None:
        """The PID of the process serving the socket (SO_PEERCRED), None if none serves it:
        how an agent finds the engine an earlier agent started."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
        pid = int.from_bytes(creds[:4], sys.byteorder, signed=True)
        return pid if pid > 0 else None

    def alive(self) -> bool:
        """True when an engine answers on the socket (a leftover file of a crash does not)."""
        try:
            self.get()
        except UapiError:
            return False
        return True

    def get(self) -> wgdevice.Device:
        reply = self._request("get", "get=1\n\n")
        try:
            state, errno = parse_get_response(reply)
        except ValueError as exc:
            raise UapiError(self.device, "get", errno_mod.EPROTO, f"bad reply: {exc}") from None
        if errno:
            raise UapiError(self.device, "get", errno)
        return state

    def set(
        self,
        *,
        private_key: bytes | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
        replace_peers: bool = False,
        peers: Sequence[wgdevice.PeerChange] = (),
    ) -> None:
        """One atomic-as-the-engine-makes-it set request."""
        operation = _describe(private_key is not None, listen_port, fwmark, replace_peers, peers)
        try:
            text = format_set_request(
                private_key=private_key,
                listen_port=listen_port,
                fwmark=fwmark,
                replace_peers=replace_peers,
                peers=peers,
            )
        except ValueError as exc:
            # The message says what was malformed; decode_key's never echoes the key.
            raise UapiError(self.device, operation, errno_mod.EINVAL, str(exc)) from None
        reply = self._request(operation, text)
        _, errno = parse_get_response(reply)
        if errno:
            raise UapiError(self.device, operation, errno)

    def _request(self, operation: str, text: str) -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            sock.sendall(text.encode())
            return _read_reply(sock).decode()
        except OSError as exc:
            code = exc.errno or errno_mod.EIO
            detail = (
                "timed out" if isinstance(exc, TimeoutError) else f"{self.path}: {exc.strerror}"
            )
            raise UapiError(self.device, operation, code, detail) from None
        finally:
            sock.close()


def _read_reply(sock: socket.socket) -> bytes:
    data = bytearray()
    while not (data.endswith(b"\n\n") or data == b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break  # some engines close after the reply instead of sending the blank line
        data += chunk
        if len(data) > _MAX_REPLY:
            raise OSError(errno_mod.EMSGSIZE, "reply too large")
    return bytes(data)


def _describe(
    private_key: bool,
    listen_port: int | None,
    fwmark: int | None,
    replace_peers: bool,
    peers: Iterable[wgdevice.PeerChange],
) -> str:
    """What a set request asks, for an error: the fields, never a key."""
    parts = []
    if private_key:
        parts.append("private key")
    if listen_port is not None:
        parts.append(f"listen port {listen_port}")
    if fwmark is not None:
        parts.append(f"fwmark {fwmark}")
    if replace_peers:
        parts.append("replace peers")
    changes = list(peers)
    removed = sum(1 for p in changes if p.remove)
    renamed = sum(1 for p in changes if p.renamed_from not in (None, p.public_key))
    if changes:
        parts.append(f"{len(changes) - removed} peer(s) set, {removed} removed")
    if renamed:
        parts.append(f"{renamed} renamed")
    return "set " + (", ".join(parts) or "nothing")
