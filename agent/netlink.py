"""Everything the agent asks of the kernel's network stack: links, routes, kernel WireGuard, offloads.

This is the one module that imports pyroute2 (an import-linter contract says so), so the rest of
the agent speaks in ipaddress networks and plain values, and tests can fake one small surface.
Every call takes `netns`: the name of a network namespace to work in (None: the agent's own), so
the sandbox and the tests can program a node's namespace from outside it.

podwire's routes carry their own routing protocol number, PROTO, so that they can be read back
and told apart from everyone else's: the per-peer routes through the device, and the fail-closed
routes (type unreachable) over the whole cluster pod range. A peer's route is more specific than
the fail-closed one, so only traffic to a node without a programmed peer hits the latter, and
is refused instead of leaving the node in clear.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno as errno_mod
import ipaddress
import os
import socket
from collections.abc import Iterable, Iterator
from typing import Any, Final

from pyroute2 import IPRoute, WireGuard
from pyroute2 import netns as pr_netns
from pyroute2.ethtool import ethtool as pr_ethtool
from pyroute2.ethtool import ioctl as pr_ethtool_ioctl
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError as _PrNetlinkError
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from podwire.agent import reconcile, uapi_client

# Between the kernel's own numbers (< 20) and the well-known daemons' (bird 12, zebra 11,
# cilium 0xcf...): 251 is not registered in iproute2's rt_protos.
PROTO: Final = 251
FAIL_CLOSED_TYPE: Final = "unreachable"  # the sender gets EHOSTUNREACH at once, not a timeout
_RTN_UNICAST: Final = 1
_SCOPE_LINK: Final = 253
_RTN_UNREACHABLE: Final = 7
# BIG TCP: 192 KiB segments, as the kernel's own selftests and Cilium use.
BIG_TCP_SIZE: Final = 196608
UDP_GRO_FORWARDING: Final = "rx-udp-gro-forwarding"


class NetlinkError(Exception):
    """A netlink request failed: `operation` says what was asked, `errno` the kernel's answer."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        reason = detail or errno_mod.errorcode.get(errno, str(errno))
        super().__init__(f"{operation}: {reason} (errno {errno})")
        self.operation = operation
        self.errno = errno


class KernelWireguardUnavailable(NetlinkError):
    """This kernel cannot create a WireGuard link; the `auto` datapath falls back to userspace."""


@dataclasses.dataclass(frozen=True, slots=True)
class Underlay:
    """The link the node's traffic leaves by, whose MTU bounds the tunnel's."""

    device: str
    mtu: int
    ipv6: bool  # reached over IPv6 (WireGuard's overhead is 20 bytes more)


@dataclasses.dataclass(frozen=True, slots=True)
class FeatureReport:
    """What apply_features found: applied names, and for the others why not."""

    applied: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (feature, reason)


@contextlib.contextmanager
def _iproute(netns: str | None) -> Iterator[Any]:
    # flags=0: never create a namespace that is not there (pyroute2's default is O_CREAT).
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def _errors(operation: str) -> Iterator[None]:
    try:
        yield
    except _PrNetlinkError as exc:
        raise NetlinkError(operation, exc.code or errno_mod.EIO, str(exc.args[-1])) from None
    except OSError as exc:
        raise NetlinkError(operation, exc.errno or errno_mod.EIO, exc.strerror or "") from None


def _index(ipr: Any, device: str) -> int:
    found = ipr.link_lookup(ifname=device)
    if not found:
        raise NetlinkError(f"find link {device}", errno_mod.ENODEV, "no such device")
    return int(found[0])


# --- links -------------------------------------------------------------------------------------


def link_exists(device: str, *, netns: str | None = None) -> bool:
    with _errors(f"find link {device}"), _iproute(netns) as ipr:
        return bool(ipr.link_lookup(ifname=device))


def link_index(device: str, *, netns: str | None = None) -> int | None:
    """The link's ifindex, or None when there is no such link."""
    with _errors(f"find link {device}"), _iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        return int(found[0]) if found else None


def link_mtu(device: str, *, netns: str | None = None) -> int:
    with _errors(f"read link {device}"), _iproute(netns) as ipr:
        return int(ipr.link("get", index=_index(ipr, device))[0].get_attr("IFLA_MTU"))


def underlay(*, address: str | None = None, netns: str | None = None) -> Underlay:
    """The underlay: the link holding `address` (or routing to it), else the default route's."""
    with _errors("find the underlay"), _iproute(netns) as ipr:
        index, ipv6 = _underlay_index(ipr, address)
        link = ipr.link("get", index=index)[0]
        return Underlay(str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU")), ipv6)


def _underlay_index(ipr: Any, address: str | None) -> tuple[int, bool]:
    if address is not None:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        for msg in ipr.get_addr(family=family):
            if msg.get_attr("IFA_ADDRESS") == str(ip) or msg.get_attr("IFA_LOCAL") == str(ip):
                return int(msg["index"]), ip.version == 6
        routes = ipr.route("get", dst=str(ip))
        return int(routes[0].get_attr("RTA_OIF")), ip.version == 6
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family):
            if route["dst_len"] == 0 and route.get_attr("RTA_TABLE") == 254:
                oif = route.get_attr("RTA_OIF")
                if oif is None:  # multipath: the first hop's link
                    hops = route.get_attr("RTA_MULTIPATH") or []
                    oif = hops[0]["oif"] if hops else None
                if oif is not None:
                    return int(oif), family == socket.AF_INET6
    raise NetlinkError("find the underlay", errno_mod.ENETUNREACH, "no default route")


def set_mtu(device: str, mtu: int, *, netns: str | None = None) -> None:
    with _errors(f"set MTU {mtu} on {device}"), _iproute(netns) as ipr:
        ipr.link("set", index=_index(ipr, device), mtu=mtu)


def set_link_up(device: str, *, netns: str | None = None) -> None:
    with _errors(f"set {device} up"), _iproute(netns) as ipr:
        ipr.link("set", index=_index(ipr, device), state="up")


def add_address(device: str, cidr: str, *, netns: str | None = None) -> None:
    """Adds the interface address cidr (e.g. 10.244.1.0/32); present already is fine."""
    iface = ipaddress.ip_interface(cidr)
    with _errors(f"add address {cidr} to {device}"), _iproute(netns) as ipr:
        try:
            ipr.addr(
                "add",
                index=_index(ipr, device),
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
        except _PrNetlinkError as exc:
            if exc.code != errno_mod.EEXIST:
                raise


def delete_link(device: str, *, netns: str | None = None) -> None:
    """Deletes the link; a link that is already gone is fine."""
    with _errors(f"delete link {device}"), _iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        if found:
            ipr.link("del", index=found[0])


# --- routes ------------------------------------------------------------------------------------


def _family(net: reconcile.IPNetwork) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


def apply_routes(
    device: str,
    add: Iterable[reconcile.IPNetwork],
    remove: Iterable[reconcile.IPNetwork],
    *,
    netns: str | None = None,
) -> None:
    """Adds, then removes, podwire's routes through device over one netlink socket.

    One socket for the whole batch: a full sync of thousands of peers is thousands of routes,
    and opening a socket (in a namespace, a helper process) per route costs seconds.
    """
    with _iproute(netns) as ipr:
        with _errors(f"find link {device}"):
            index = _index(ipr, device)
        for dst in add:
            with _errors(f"add route {dst} dev {device}"):
                ipr.route(
                    "replace",
                    dst=str(dst),
                    family=_family(dst),
                    oif=index,
                    proto=PROTO,
                    scope=_SCOPE_LINK,
                )
        for dst in remove:
            with _errors(f"remove route {dst} dev {device}"):
                _delete(
                    ipr,
                    dst=str(dst),
                    family=_family(dst),
                    oif=index,
                    proto=PROTO,
                    scope=_SCOPE_LINK,
                )


def list_routes(device: str, *, netns: str | None = None) -> list[reconcile.IPNetwork]:
    """podwire's routes through device (not the fail-closed ones)."""
    with _errors(f"list routes on {device}"), _iproute(netns) as ipr:
        index = _index(ipr, device)
        return [
            net
            for route, net in _own_routes(ipr)
            if route["type"] == _RTN_UNICAST and route.get_attr("RTA_OIF") == index
        ]


def add_fail_closed(cidr: reconcile.IPNetwork, *, netns: str | None = None) -> None:
    """Refuses traffic to cidr unless a more specific route (a peer's) takes it; idempotent."""
    with _errors(f"add fail-closed route {cidr}"), _iproute(netns) as ipr:
        ipr.route(
            "replace", dst=str(cidr), family=_family(cidr), type=FAIL_CLOSED_TYPE, proto=PROTO
        )


def remove_fail_closed(cidr: reconcile.IPNetwork, *, netns: str | None = None) -> None:
    with _errors(f"remove fail-closed route {cidr}"), _iproute(netns) as ipr:
        _delete(ipr, dst=str(cidr), family=_family(cidr), type=FAIL_CLOSED_TYPE, proto=PROTO)


def list_fail_closed(*, netns: str | None = None) -> list[reconcile.IPNetwork]:
    with _errors("list fail-closed routes"), _iproute(netns) as ipr:
        return [net for route, net in _own_routes(ipr) if route["type"] == _RTN_UNREACHABLE]


def _own_routes(ipr: Any) -> Iterator[tuple[Any, reconcile.IPNetwork]]:
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family):
            if route["proto"] != PROTO or route.get_attr("RTA_TABLE") != 254:
                continue
            dst = route.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            yield route, ipaddress.ip_network(f"{dst}/{route['dst_len']}")


def _delete(ipr: Any, **spec: Any) -> None:
    try:
        ipr.route("del", **spec)
    except _PrNetlinkError as exc:
        if exc.code not in (errno_mod.ESRCH, errno_mod.ENOENT):  # already gone is the goal
            raise


# --- the kernel's WireGuard --------------------------------------------------------------------


def create_kernel_device(device: str, *, netns: str | None = None) -> None:
    """Creates the WireGuard link (kept if it is there), or raises KernelWireguardUnavailable."""
    operation = f"create kernel WireGuard link {device}"
    with _errors(operation), _iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        if found:
            kind = _link_kind(ipr.link("get", index=found[0])[0])
            if kind != "wireguard":
                raise NetlinkError(operation, errno_mod.EEXIST, f"{device} exists as {kind!r}")
            return
        try:
            ipr.link("add", ifname=device, kind="wireguard")
        except _PrNetlinkError as exc:
            # No module: the kernel knows no link kind "wireguard" (EOPNOTSUPP), or a
            # stripped-down netlink answers ENOENT/EINVAL; either way, use userspace.
            if exc.code in (errno_mod.EOPNOTSUPP, errno_mod.ENOENT, errno_mod.EINVAL):
                raise KernelWireguardUnavailable(
                    operation, exc.code, "this kernel has no WireGuard"
                ) from None
            raise


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


@contextlib.contextmanager
def _wireguard(netns: str | None) -> Iterator[Any]:
    wg = WireGuard(netns=netns, flags=0) if netns else WireGuard()
    try:
        yield wg
    finally:
        wg.close()


def kernel_set_device(
    device: str,
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    netns: str | None = None,
) -> None:
    what = " and ".join(
        n for n, v in (("private key", private_key), ("listen port", listen_port)) if v is not None
    )
    with _errors(f"set {what or 'nothing'} on {device}"), _wireguard(netns) as wg:
        wg.set(
            device,
            listen_port=listen_port,
            private_key=None if private_key is None else base64.b64encode(private_key).decode(),
        )


def kernel_set_peer(
    device: str, change: uapi_client.PeerChange, *, netns: str | None = None
) -> None:
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
    with _errors(f"{action} a peer on {device}"), _wireguard(netns) as wg:
        wg.set(device, peer=peer)


def kernel_read_device(device: str, *, netns: str | None = None) -> uapi_client.DeviceState:
    """The kernel device's state, in the same shape the UAPI client returns (no private key)."""
    with _errors(f"read WireGuard device {device}"), _wireguard(netns) as wg:
        messages = list(wg.info(device))
    has_key = False
    public_key: str | None = None
    port = fwmark = 0
    peers: dict[str, uapi_client.PeerState] = {}
    for msg in messages:
        has_key = has_key or msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None
        public_key = _key_text(msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) or public_key
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            state = _kernel_peer(nla)
            # A big device's dump splits one peer's allowed-ips over several messages.
            before = peers.get(state.public_key)
            if before is not None:
                state = dataclasses.replace(
                    before, allowed_ips=before.allowed_ips + state.allowed_ips
                )
            peers[state.public_key] = state
    return uapi_client.DeviceState(
        has_private_key=has_key,
        public_key=public_key if has_key else None,
        listen_port=int(port),
        fwmark=int(fwmark),
        peers=tuple(peers.values()),
    )


def _kernel_peer(nla: Any) -> uapi_client.PeerState:
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
    return uapi_client.PeerState(
        public_key=_key_text(nla.get_attr("WGPEER_A_PUBLIC_KEY")) or "",
        endpoint=(
            reconcile.make_endpoint(endpoint["addr"], endpoint["port"])
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


# --- kernel features ---------------------------------------------------------------------------


def apply_features(
    device: str,
    *,
    underlay_device: str | None = None,
    gro: bool = True,
    big_tcp: bool = True,
    udp_gro_forwarding: bool = True,
    netns: str | None = None,
) -> FeatureReport:
    """Applies each wanted feature where the kernel supports it, and says what it did.

    Never raises for a feature the kernel lacks: a missing offload costs speed, not traffic.
    A feature turned off is taken back to the kernel's default on the device, which podwire
    owns (an agent restarted with new config finds the old sizes there); the underlay is the
    node's, and podwire never turns its UDP GRO forwarding off.
    """
    applied: list[str] = []
    skipped: list[tuple[str, str]] = []
    sizes = link_offload_sizes(device, netns=netns)
    wanted = [("gro", gro, _GRO_ATTRS), ("big_tcp", big_tcp, _BIG_TCP_ATTRS)]
    for name, on, attrs in wanted:
        missing = [a for a in attrs if a not in sizes]
        if not on:
            if not missing and any(sizes[a] > LEGACY_SIZE for a in attrs):
                _set_offload_sizes(device, dict.fromkeys(attrs, LEGACY_SIZE), netns=netns)
            skipped.append((name, "turned off"))
            continue
        if missing:
            skipped.append((name, f"the kernel has no {', '.join(missing)}"))
            continue
        # What the device sends is bounded by what it can segment; what it receives is not.
        limit = sizes.get("tso_max_size", BIG_TCP_SIZE)
        if any(a.startswith("gso_") for a in attrs) and limit <= LEGACY_SIZE:
            skipped.append((name, f"{device} takes no segment above 64 KiB (tso_max_size {limit})"))
            continue
        try:
            _set_offload_sizes(device, dict.fromkeys(attrs, BIG_TCP_SIZE), netns=netns)
            applied.append(name)
        except NetlinkError as exc:
            skipped.append((name, str(exc)))
    if not udp_gro_forwarding:
        skipped.append(("udp_gro_forwarding", "turned off"))
    elif underlay_device is None:
        skipped.append(("udp_gro_forwarding", "no underlay device"))
    else:
        reason = _enable_udp_gro_forwarding(underlay_device, netns)
        if reason:
            skipped.append(("udp_gro_forwarding", reason))
        else:
            applied.append("udp_gro_forwarding")
    return FeatureReport(tuple(applied), tuple(skipped))


# The kernel's sizes before BIG TCP (GSO_LEGACY_MAX_SIZE).
LEGACY_SIZE: Final = 65536
_GRO_ATTRS: Final = ("gro_max_size",)
_BIG_TCP_ATTRS: Final = ("gso_max_size", "gso_ipv4_max_size", "gro_ipv4_max_size")
_SIZE_ATTRS: Final = {
    "gso_max_size": "IFLA_GSO_MAX_SIZE",
    "gro_max_size": "IFLA_GRO_MAX_SIZE",
    "tso_max_size": "IFLA_TSO_MAX_SIZE",
    "gso_ipv4_max_size": "IFLA_GSO_IPV4_MAX_SIZE",
    "gro_ipv4_max_size": "IFLA_GRO_IPV4_MAX_SIZE",
}


class _ifinfmsg(ifinfmsg):
    """A link message that also knows IPv4 BIG TCP's sizes (Linux 6.3), which pyroute2 0.9 lacks."""

    # Compile this class's own attribute table instead of inheriting ifinfmsg's.
    _nlmsg_base__compiled_nla = False
    nla_map = (
        *ifinfmsg.nla_map,
        ("IFLA_DEVLINK_PORT", "hex"),  # 62
        ("IFLA_GSO_IPV4_MAX_SIZE", "uint32"),  # 63
        ("IFLA_GRO_IPV4_MAX_SIZE", "uint32"),  # 64
    )


def link_offload_sizes(device: str, *, netns: str | None = None) -> dict[str, int]:
    """The device's GSO/GRO/TSO size limits, by iproute2's names; a size the kernel lacks is absent."""
    with _errors(f"read the offload sizes of {device}"), _iproute(netns) as ipr:
        ipr.marshal.msg_map[RTM_NEWLINK] = _ifinfmsg
        link = ipr.link("get", index=_index(ipr, device))[0]
        found = {name: link.get_attr(nla) for name, nla in _SIZE_ATTRS.items()}
    return {name: int(value) for name, value in found.items() if value is not None}


def _set_offload_sizes(device: str, sizes: dict[str, int], *, netns: str | None = None) -> None:
    what = ", ".join(f"{name} {size}" for name, size in sizes.items())
    with _errors(f"set {what} on {device}"), _iproute(netns) as ipr:
        msg = _ifinfmsg()
        msg["index"] = _index(ipr, device)
        msg["attrs"] = [(_SIZE_ATTRS[name], size) for name, size in sizes.items()]
        msg["header"]["type"] = RTM_NEWLINK
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
        # nlm_request_batch: IPRoute.nlm_request of pyroute2 0.9.7 fails on its own status.
        ipr.nlm_request_batch([msg])


def _enable_udp_gro_forwarding(device: str, netns: str | None) -> str:
    """Turns the ethtool feature on; returns why not, or "" when it is on."""
    try:
        io = _ethtool_in(netns)
    except OSError as exc:
        return f"no ethtool socket: {exc.strerror}"
    try:
        io.change_ifname(device)
        features = pr_ethtool.EthtoolFeatures.from_ioctl(
            features=io.get_features(), offload_flags=io.get_offload_flags()
        )
        feature = features.features.get(UDP_GRO_FORWARDING)
        if feature is None or not feature.available:
            return f"{device} does not offer {UDP_GRO_FORWARDING}"
        if not feature.enable:
            feature.enable = True
            raw = io.get_features()
            pr_ethtool.EthtoolFeatures.to_ioctl(raw, features)
            io.set_features(raw)
        return ""
    except Exception as exc:  # the ioctl layer raises several kinds; all mean "not applied"
        return f"ethtool on {device}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            io.close()


def _ethtool_in(netns: str | None) -> Any:
    # The ethtool ioctl acts in the namespace its socket was made in: make it inside netns
    # (setns moves only this thread), then come straight back. flags=0: never create one.
    if netns is None:
        return pr_ethtool_ioctl.IoctlEthtool()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(netns, flags=0)
        try:
            return pr_ethtool_ioctl.IoctlEthtool()
        finally:
            pr_netns.setns(home, flags=0)
    finally:
        os.close(home)
