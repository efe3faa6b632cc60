"""The kernel's WireGuard over generic netlink: create the link, configure it, read it back.

The kernel datapath's counterpart of the userspace engine's UAPI client: it takes and returns
the device model of `podwire.agent.wgdevice`, so a peer change and a device read back mean the
same on both backends. Creating the link is also how `auto` learns that the kernel has no
WireGuard: KernelWireguardUnavailable, and the agent runs the userspace engine instead.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno as errno_mod
import ipaddress
from collections.abc import Iterator
from typing import Any

from pyroute2 import WireGuard
from pyroute2.netlink.exceptions import NetlinkError as PrNetlinkError

from podwire.agent import wgdevice
from podwire.agent.netlink import core


def create_device(device: str, *, netns: str | None = None) -> None:
    """Creates the WireGuard link (kept if it is there), or raises KernelWireguardUnavailable."""
    operation = f"create kernel WireGuard link {device}"
    with core.errors(operation), core.iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        if found:
            kind = _link_kind(ipr.link("get", index=found[0])[0])
            if kind != "wireguard":
                raise core.NetlinkError(operation, errno_mod.EEXIST, f"{device} exists as {kind!r}")
            return
        try:
            ipr.link("add", ifname=device, kind="wireguard")
        except PrNetlinkError as exc:
            # No module: the kernel knows no link kind "wireguard" (EOPNOTSUPP), or a
            # stripped-down netlink answers ENOENT/EINVAL; either way, use userspace.
            if exc.code in (errno_mod.EOPNOTSUPP, errno_mod.ENOENT, errno_mod.EINVAL):
                raise core.KernelWireguardUnavailable(
                    operation, exc.code, "this kernel has no WireGuard"
                ) from None
            raise


def set_device(
    device: str,
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    netns: str | None = None,
) -> None:
    """Sets the device's private key and/or listen port; None leaves one as it is."""
    what = " and ".join(
        n for n, v in (("private key", private_key), ("listen port", listen_port)) if v is not None
    )
    with core.errors(f"set {what or 'nothing'} on {device}"), _wireguard(netns) as wg:
        wg.set(
            device,
            listen_port=listen_port,
            private_key=None if private_key is None else base64.b64encode(private_key).decode(),
        )


def set_peer(device: str, change: wgdevice.PeerChange, *, netns: str | None = None) -> None:
    """One peer added, changed or removed, with the same meaning as a UAPI peer change."""
    peer: dict[str, Any] = {"public_key": change.public_key}
    if change.remove:
        peer["remove"] = True
    else:
        if change.endpoint is not None:
            peer["endpoint_addr"] = change.endpoint.host
            peer["endpoint_port"] = change.endpoint.port
        if change.persistent_keepalive is not None:
            peer["persistent_keepalive"] = change.persistent_keepalive
        peer["update_only"] = change.update_only
        peer["replace_allowed_ips"] = change.replace_allowed_ips
        if change.allowed_ips or change.replace_allowed_ips:
            peer["allowed_ips"] = [str(net) for net in change.allowed_ips]
    action = "remove" if change.remove else "set"
    with core.errors(f"{action} a peer on {device}"), _wireguard(netns) as wg:
        wg.set(device, peer=peer)


def read_device(device: str, *, netns: str | None = None) -> wgdevice.Device:
    """The kernel device's state, in the same shape the UAPI client returns (no private key)."""
    with core.errors(f"read WireGuard device {device}"), _wireguard(netns) as wg:
        messages = list(wg.info(device))
    has_key = False
    public_key: str | None = None
    port = fwmark = 0
    peers: dict[str, wgdevice.Peer] = {}
    for msg in messages:
        has_key = has_key or msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None
        public_key = _key_text(msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) or public_key
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            state = _peer(nla)
            # A big device's dump splits one peer's allowed-ips over several messages.
            before = peers.get(state.public_key)
            if before is not None:
                state = dataclasses.replace(
                    before, allowed_ips=before.allowed_ips + state.allowed_ips
                )
            peers[state.public_key] = state
    return wgdevice.Device(
        has_private_key=has_key,
        public_key=public_key if has_key else None,
        listen_port=int(port),
        fwmark=int(fwmark),
        peers=tuple(peers.values()),
    )


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


@contextlib.contextmanager
def _wireguard(netns: str | None) -> Iterator[Any]:
    # flags=0: never create a namespace that is not there, as core.iproute.
    wg = WireGuard(netns=netns, flags=0) if netns else WireGuard()
    try:
        yield wg
    finally:
        wg.close()


def _peer(nla: Any) -> wgdevice.Peer:
    endpoint = nla.get_attr("WGPEER_A_ENDPOINT")
    handshake = nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    seconds = 0.0
    if handshake is not None:
        seconds = handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
    allowed = [
        ipaddress.ip_network(ip["addr"], strict=False)
        for ip in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ()
        if "addr" in ip
    ]
    return wgdevice.Peer(
        public_key=_key_text(nla.get_attr("WGPEER_A_PUBLIC_KEY")) or "",
        endpoint=(
            wgdevice.make_endpoint(endpoint["addr"], endpoint["port"])
            if endpoint is not None and endpoint["port"]
            else None
        ),
        allowed_ips=tuple(allowed),
        last_handshake=seconds or None,
        rx_bytes=int(nla.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx_bytes=int(nla.get_attr("WGPEER_A_TX_BYTES") or 0),
        persistent_keepalive=int(nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
    )


def _key_text(value: Any) -> str | None:
    # pyroute2 decodes a key NLA to base64 bytes, and get_attr may give the NLA or its value.
    if value is None:
        return None
    if not isinstance(value, bytes | str):
        value = value.get("value")
    return value.decode() if isinstance(value, bytes) else value
