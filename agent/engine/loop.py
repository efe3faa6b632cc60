"""The engine's I/O loop: the one place that reads clocks and touches TUN, UDP and UAPI.

One thread, one epoll (poller). Each wakeup drains what is ready in batches (up to BATCH reads
from the TUN device, about BATCH datagrams from each UDP socket) and hands every packet to the
Device, whose answer is a list of actions: datagrams to send, packets to deliver. A batch's
datagrams leave together (trains to one endpoint in one GSO call) and its packets reach TUN
together (TCP segments of one flow in one write), which is where the offloads pay. The Device's
tick runs every TICK_INTERVAL seconds, or earlier when it names a nearer deadline. UAPI
requests are answered between batches, so `wg` never waits behind more than one batch.

A lone packet (what wakes a quiet engine: a ping, a request) is read once rather than drained
(QUIET) and takes the shortest way: Device.send_alone or receive_alone, one system call
out. After a quiet moment every layer it crosses costs tens of microseconds of cold cache, and
its round trip is the latency users see.

Under a handshake flood the kernel steers (see steer): data reaches a socket of its own, read
in full; the rest lands on a small socket that the loop reads, under load, only within
BUDGETED_PER_WINDOW datagrams per BUDGET_WINDOW, leaving it out of the poller once that is
spent, so the kernel drops the excess for nothing. The handshakes from peers' endpoints have a
socket of their own too, with a budget ten times larger (a flood from a spoofed peer address
must not starve the data either). The program follows the peers' endpoints (after each UAPI
set and once a second).

Housekeeping once a second notices what `wg` would want to know (a handshake completed, a
peer added or removed, drop counters growing) and logs it; the TUN device's MTU is read back
then too, so `ip link set mtu` reaches the Device.
"""

from __future__ import annotations

import base64
import errno
import pathlib
import socket
import time
from collections.abc import Callable, Iterable

from podwire.agent import log as log_mod
from podwire.agent.engine import actions as actions_mod
from podwire.agent.engine import device as device_mod
from podwire.agent.engine import ipc, poller, steer, uapi
from podwire.agent.engine import tun as tun_mod
from podwire.agent.engine import udp as udp_mod

# Implementation constants, not the protocol's.
BATCH = 128
TICK_INTERVAL = 0.1
HOUSEKEEPING_INTERVAL = 1.0
COUNTERS_LOG_INTERVAL = 30.0
# Load, judged as the kernel and wireguard-go judge it, by the handshake backlog: a batch of
# datagrams that holds this many handshake messages means they arrive faster than a
# Diffie-Hellman each can be spent on them. A loop fast enough to keep up reads them in small
# batches, so more handshakes from unknown sources in one BUDGET_WINDOW than their budget
# (BUDGETED_PER_WINDOW) is load too. The Device is then under load (mac2, cookie replies, the
# per-source rate limit) until UNDER_LOAD_HOLD seconds after the last such sign.
UNDER_LOAD_BACKLOG = BATCH // 8
UNDER_LOAD_HOLD = 1.0
# Under load, the budgeted socket's datagrams (handshakes from unknown sources: the flood, a
# peer that roamed) read per window: 1,000 a second costs at most 73 ms of a core a second
# should every one be a Diffie-Hellman, and gives a roaming peer's initiation its share.
BUDGET_WINDOW = 0.1
BUDGETED_PER_WINDOW = 100
# The peers' endpoints' handshakes, read per window under load: far more than the peers of a
# large cluster need (a handshake each every two minutes, all of them at once after a restart
# in a few windows), and a bound should a flood spoof their addresses.
PRIORITY_PER_WINDOW = 1000

# A descriptor readable this long after its last read was handled is read once, not drained: what wakes a quiet
# engine is mostly a lone packet, and the read that would find nothing more (EAGAIN, raised as
# an exception) is work on that packet's round trip. Should more wait, epoll says so at once;
# reads closer together than this (a burst, a stream) drain in batches as before.
QUIET = 0.001

Clock = Callable[[], float]


def short_key(public_key: bytes) -> str:
    """A public key's first base64 characters: enough to tell peers apart in a log."""
    return base64.b64encode(public_key).decode()[:8]


class Engine:
    """Moves packets between the TUN device, the UDP socket and the Device until stopped."""

    def __init__(
        self,
        *,
        device: device_mod.Device,
        tun: tun_mod.Tun,
        bind: udp_mod.UdpBind,
        uapi_listener: socket.socket,
        clock: Clock = time.monotonic,
        fast_path: str = "",
        features_path: pathlib.Path | None = None,
    ) -> None:
        # Bound here, not at import: binding fixes the configuration in force at that moment.
        self.log = log_mod.get("engine")
        self.device = device
        self.tun = tun
        self.bind = bind
        self._listener = uapi_listener
        self._clock = clock
        self._fast_path = fast_path
        self._features_path = features_path
        self._poller = poller.Poller()
        self._connections: dict[int, ipc.UapiConnection] = {}
        self._stopping = False
        self.stop_reason = ""
        now = clock()
        self._next_tick = now
        # The Device's nearest deadline as of the last tick (or UAPI set), and when the loop
        # next has timer work: see _run_timers.
        self._deadline: float | None = None
        self._wake = now
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        self._next_counters_log = now + COUNTERS_LOG_INTERVAL
        self._handshakes: dict[bytes, float | None] = {}
        self._under_load_until = now - UNDER_LOAD_HOLD
        self._routing_loops_told: set[bytes] = set()
        self._last_counters: dict[str, int] = {}
        self._gso_off_told = False
        self._coalescing_off_told = False
        self._steer_off_told = False
        self._steered = False
        # Per budgeted socket (the budgeted and the priority one): its budget per window and
        # what is left of it; the sockets out of the poller while their budget is spent.
        self._budgets: dict[socket.socket, int] = {}
        self._budget_left: dict[socket.socket, int] = {}
        self._budget_window_end = now
        self._budget_paused: list[socket.socket] = []
        # The Device's handshake messages when this budget window began (see _on_udp).
        self._window_handshakes = 0
        self._kernel_drops = 0
        self._tun_done = now - QUIET
        device.listen_port = bind.port
        self._poller.register(tun.fd, poller.READ, self._on_tun)
        self._poller.register(uapi_listener, poller.READ, self._on_accept)
        self._register_bind(bind)

    # Running and stopping.

    def add_wakeup(self, sock: socket.socket, on_wakeup: Callable[[], None]) -> None:
        """Watches sock (a signal wakeup socket): on_wakeup runs once it is readable."""

        def drain(_mask: int) -> None:
            try:
                while sock.recv(4096):
                    pass
            except BlockingIOError:
                pass
            on_wakeup()

        self._poller.register(sock, poller.READ, drain)

    def stop(self, reason: str) -> None:
        if not self._stopping:
            self._stopping = True
            self.stop_reason = reason

    def run(self) -> None:
        """Serves until stop() or until the TUN device goes away."""
        timeout = 0.0
        while not self._stopping:
            ready = self._poller.poll(timeout)
            try:
                for callback, mask in ready:
                    callback(mask)
                timeout = self._run_timers()
            except tun_mod.TunGone:
                self.stop("tun_device_removed")

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        self._poller.close()
        self.bind.close()

    def _run_timers(self) -> float:
        """Ticks the Device when due; returns how long the poller may sleep.

        Between ticks this is a clock read and a comparison: the Device's deadlines are looked
        at (a pass over the peers) only after a tick or a UAPI set. Packets arm timers too,
        but never nearer than a keepalive or rekey timeout (seconds), so the next tick is the
        nearest wake they could need."""
        now = self._clock()
        if now < self._wake:
            return self._wake - now
        if now >= self._next_tick or (self._deadline is not None and now >= self._deadline):
            self._next_tick = now + TICK_INTERVAL
            self._perform(self.device.tick(now))
            self._deadline = self.device.next_deadline()
            self._notice_kernel_drops(now)
        if now >= self._budget_window_end:
            self._budget_window_end = now + BUDGET_WINDOW
            self._window_handshakes = self.device.handshake_messages
            self._budget_left.update(self._budgets)
            self._resume_budgeted()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
            self._housekeeping(now)
        wake = self._next_tick if self._deadline is None else min(self._deadline, self._next_tick)
        if self._budgets:
            wake = min(wake, self._budget_window_end)  # the budgets are renewed on time
        self._wake = wake
        return max(0.0, wake - now)

    def _rewake(self) -> None:
        """After something that may have armed a nearer deadline: the next pass looks."""
        self._deadline = self.device.next_deadline()
        if self._deadline is not None:
            self._wake = min(self._wake, self._deadline)

    # The data path.

    def _perform(self, actions: Iterable[actions_mod.Action]) -> None:
        for action in actions:
            if type(action) is actions_mod.SendDatagram:
                self.bind.send(action.data, action.endpoint)
            elif type(action) is actions_mod.DeliverPacket:
                self.tun.write(action.packet)
            else:
                self.log.warning("unknown_action", action=type(action).__name__)

    def _perform_batch(self, actions: Iterable[actions_mod.Action]) -> None:
        """Performs a batch's actions: its datagrams in one go, its packets in another."""
        datagrams: list[tuple[bytes, actions_mod.Endpoint]] = []
        packets: list[bytes] = []
        for action in actions:
            if type(action) is actions_mod.SendDatagram:
                datagrams.append((action.data, action.endpoint))
            elif type(action) is actions_mod.DeliverPacket:
                packets.append(action.packet)
            else:
                self.log.warning("unknown_action", action=type(action).__name__)
        if datagrams:
            self.bind.send_batch(datagrams)
            if self.bind.gso_off_reason and not self._gso_off_told:
                self._gso_off_told = True
                self.log.warning("udp_gso_off", reason=self.bind.gso_off_reason)
                self.publish_features()
        if packets:
            self.tun.write_batch(packets)
            if self.tun.vnet_hdr and not self.tun.coalescing and not self._coalescing_off_told:
                self._coalescing_off_told = True
                self.log.warning("tun_coalescing_off", reason="the kernel refused a GSO write")
                self.publish_features()

    def _on_tun(self, _mask: int) -> None:
        now = self._clock()
        packets = self.tun.read_batch(BATCH if now - self._tun_done < QUIET else 1)
        if len(packets) == 1:
            # A lone packet (a ping, a request, an ACK in an idle moment) takes the shortest
            # way: no batch to group, nothing to join. Its round trip is the latency users see.
            sealed = self.device.send_alone(packets[0], now)
            if sealed is not None:
                self.bind.send(*sealed)
            else:
                self._perform(self.device.send_packet(packets[0], now))
        elif packets:
            self._perform_batch(self.device.send_packets(packets, self._clock()))
        self._tun_done = self._clock()

    def _on_udp(self, sock: socket.socket) -> Callable[[int], None]:
        # When this socket's last read was handled: QUIET is measured from there, so a reader
        # slower than the datagrams arrive (a flood of handshakes) still reads in batches.
        done = self._clock() - QUIET
        # The socket of unknown sources' handshakes (or the only socket): more of them in a
        # budget window than its budget is load, however small the batches they came in.
        rated = not self._steered or sock is self.bind.budgeted

        def on_readable(_mask: int) -> None:
            nonlocal done
            now = self._clock()
            datagrams = self.bind.receive_batch(sock, BATCH if now - done < QUIET else 1)
            device = self.device
            device.under_load = now < self._under_load_until
            handshakes = device.handshake_messages
            if len(datagrams) == 1:
                # As a lone packet from TUN: the shortest way.
                data, source = datagrams[0]
                packet = device.receive_alone(data, source, now)
                if packet is not None:
                    self.tun.write(packet)
                else:
                    self._perform(device.receive_datagram(data, source, now))
            else:
                self._perform_batch(device.receive_datagrams(datagrams, now))
            seen = device.handshake_messages
            if seen - handshakes >= UNDER_LOAD_BACKLOG or (
                rated and seen - self._window_handshakes > BUDGETED_PER_WINDOW
            ):
                self._on_handshake_backlog(now)
            done = self._clock()

        return on_readable

    def _on_budgeted(self, sock: socket.socket) -> Callable[[int], None]:
        """A socket of handshakes: read in full, as the others, unless under load; then only
        within the window's budget, and left out of the poller once the budget is spent
        (the kernel drops what overflows its buffer)."""
        read_in_full = self._on_udp(sock)

        def on_readable(mask: int) -> None:
            now = self._clock()
            if now >= self._under_load_until:
                read_in_full(mask)
                return
            left = self._budget_left[sock]
            datagrams = self.bind.receive_batch(sock, min(BATCH, left)) if left else []
            self._budget_left[sock] = left = left - len(datagrams)
            self.device.under_load = True
            if datagrams:
                self._perform_batch(self.device.receive_datagrams(datagrams, now))
            if left <= 0:
                # Spent while the flood goes on: that is load, held as a backlog is.
                self._on_handshake_backlog(now)
                self._poller.unregister(sock)
                self._budget_paused.append(sock)

        return on_readable

    def _resume_budgeted(self) -> None:
        paused, self._budget_paused = self._budget_paused, []
        for sock in paused:
            self._poller.register(sock, poller.READ, self._on_budgeted(sock))

    def _notice_kernel_drops(self, now: float) -> None:
        """What the kernel dropped for the budgeted socket since the last look: a flood that
        the loop never reads is load too."""
        drops = self.bind.kernel_drops() if self._steered else None
        if drops is None:
            return
        if drops - self._kernel_drops >= UNDER_LOAD_BACKLOG:
            self._on_handshake_backlog(now)
        self._kernel_drops = drops

    def _on_handshake_backlog(self, now: float) -> None:
        if now >= self._under_load_until:
            self.log.warning("under_load", handshakes_per_batch_at_least=UNDER_LOAD_BACKLOG)
        self._under_load_until = now + UNDER_LOAD_HOLD
        self.device.under_load = True

    def _register_bind(self, bind: udp_mod.UdpBind) -> None:
        # A bind of one socket (the kernel refused steering, or a test's fake) has no
        # budgeted socket, no drops to watch and no program to follow the endpoints.
        self._steered = bind.steered
        self._budgets = {}
        if self._steered:
            self._budgets = {
                bind.sockets[steer.BUDGETED]: BUDGETED_PER_WINDOW,
                bind.sockets[steer.PRIORITY]: PRIORITY_PER_WINDOW,
            }
        self._budget_left = dict(self._budgets)
        for sock in bind.sockets:
            handler = self._on_budgeted(sock) if sock in self._budgets else self._on_udp(sock)
            self._poller.register(sock, poller.READ, handler)
        self._kernel_drops = (bind.kernel_drops() or 0) if self._steered else 0
        self._steer_to_endpoints()

    def _steer_to_endpoints(self) -> None:
        """Call when the peers' endpoints may have changed: the program follows them."""
        if not self._steered:
            reason = getattr(self.bind, "steer_off_reason", "")
            if reason and not self._steer_off_told:
                self._steer_off_told = True
                self.log.warning("udp_steering_off", reason=reason)
            return
        hosts = {p.endpoint[0] for p in self.device.peers.values() if p.endpoint is not None}
        if self.bind.steer_sources(hosts):
            self.log.debug("steering", sources=self.bind.steered_sources, endpoints=len(hosts))
        elif self.bind.steer_off_reason and not self._steer_off_told:
            # The program stays as it was: new endpoints' handshakes take the budgeted socket.
            self._steer_off_told = True
            self.log.warning("udp_steering_stale", reason=self.bind.steer_off_reason)

    def _rebind(self, port: int, fwmark: int) -> None:
        """Moves to a new listen port; the old socket stays if the new one cannot be had."""
        try:
            new = udp_mod.UdpBind.open(
                port,
                fwmark=fwmark,
                offloads=self.bind.offloads_wanted,
                steering=self.bind.steering_wanted,
            )
        except OSError as exc:
            code = errno.EADDRINUSE if exc.errno == errno.EADDRINUSE else errno.EIO
            raise uapi.UapiError(f"cannot bind port {port}: {exc.strerror}", errno=code) from None
        for sock in self.bind.sockets:
            if sock not in self._budget_paused:
                self._poller.unregister(sock)
        self._budget_paused = []
        self.bind.close()
        self.bind = new
        self._register_bind(new)
        self.log.info("listening", port=new.port, dual_stack=new.dual_stack)
        self.publish_features()

    # UAPI.

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self.log.warning("uapi_accept_failed", error=exc.strerror)
                return
            sock.setblocking(False)
            connection = ipc.UapiConnection(sock, self._handle_request)
            self._connections[sock.fileno()] = connection
            self._poller.register(sock, poller.READ, self._on_connection(connection))

    def _on_connection(self, connection: ipc.UapiConnection) -> Callable[[int], None]:
        def on_event(mask: int) -> None:
            if mask & poller.READ:
                connection.on_readable()
            if mask & poller.WRITE:
                connection.on_writable()
            self._update_connection(connection)

        return on_event

    def _update_connection(self, connection: ipc.UapiConnection) -> None:
        fd = connection.sock.fileno()
        if connection.finished:
            self._poller.unregister(connection.sock)
            del self._connections[fd]
            connection.close()
            return
        events = poller.WRITE if connection.wants_write else 0
        if connection.wants_read:
            events |= poller.READ
        self._poller.modify(connection.sock, events)

    def _handle_request(self, request: uapi.Request) -> str:
        if isinstance(request, uapi.GetRequest):
            return uapi.serialize_get(self.device)
        self._apply_set(request)
        return ""

    def _apply_set(self, request: uapi.SetRequest) -> None:
        # The new port is bound before anything is applied, so a taken port changes nothing.
        fwmark = self.device.fwmark if request.fwmark is None else request.fwmark
        if request.listen_port is not None and request.listen_port != self.bind.port:
            self._rebind(request.listen_port, fwmark)
        elif request.fwmark is not None and request.fwmark != self.device.fwmark:
            try:
                self.bind.set_fwmark(request.fwmark)
            except OSError as exc:
                raise uapi.UapiError(
                    f"cannot set fwmark: {exc.strerror}", errno=exc.errno or errno.EIO
                ) from None
        before = set(self.device.peers)
        renames = uapi.apply_set(self.device, request, now=self._clock())
        self.device.listen_port = self.bind.port
        for old, new in renames:
            self.log.info("peer_renamed", peer=short_key(new), previous_key=short_key(old))
            self._handshakes[new] = self._handshakes.pop(old, None)
            if old in self._routing_loops_told:
                self._routing_loops_told.discard(old)
                self._routing_loops_told.add(new)
            before.discard(old)
            before.add(new)
        after = set(self.device.peers)
        for key in after - before:
            self.log.info("peer_added", peer=short_key(key))
        for key in before - after:
            self.log.info("peer_removed", peer=short_key(key))
            self._handshakes.pop(key, None)
            self._routing_loops_told.discard(key)
        if request.private_key is not None:
            previous = self.device.previous
            self.log.info(
                "private_key_changed",
                public_key=short_key(self.device.public_key or b""),
                previous_key=None if previous is None else short_key(previous.identity.public_key),
                previous_key_answered_for=(
                    None if previous is None else self.device.timer_config.previous_key_grace
                ),
            )
        self._steer_to_endpoints()
        # A new endpoint or keepalive interval may have work due right now.
        self._perform(self.device.tick(self._clock()))
        self._rewake()

    # Housekeeping.

    def _housekeeping(self, now: float) -> None:
        self._steer_to_endpoints()  # a peer may have roamed
        for key, peer in self.device.peers.items():
            handshake = peer.last_handshake_wall
            if handshake is not None and handshake != self._handshakes.get(key):
                self.log.info(
                    "handshake_completed", peer=short_key(key), endpoint=_endpoint(peer.endpoint)
                )
            self._handshakes[key] = handshake
            if peer.routing_loops and key not in self._routing_loops_told:
                self._routing_loops_told.add(key)
                self.log.warning(
                    "routing_loop",
                    peer=short_key(key),
                    endpoint=_endpoint(peer.endpoint),
                    hint="a route sends the peer's endpoint into the tunnel; its packets "
                    "are dropped (counter routing_loop)",
                )
        try:
            mtu = self.tun.mtu()
        except tun_mod.TunError:
            mtu = self.device.mtu
        if mtu != self.device.mtu:
            self.log.info("mtu_changed", mtu=mtu)
            self.device.mtu = mtu
        if now >= self._next_counters_log:
            self._next_counters_log = now + COUNTERS_LOG_INTERVAL
            self._log_counters()

    def counters(self) -> dict[str, int]:
        """The Device's drop and handled counters plus the I/O layer's own."""
        counts = self.device.counters.as_dict()
        counts["tun_read_errors"] = self.tun.read_errors
        counts["tun_write_errors"] = self.tun.write_errors
        counts["udp_send_errors"] = self.bind.send_errors
        counts["tun_bad_offload"] = self.tun.bad_offload
        counts["tun_coalesced_writes"] = self.tun.coalesced_writes
        counts["udp_gso_sends"] = self.bind.gso_sends
        counts["udp_gro_receives"] = self.bind.gro_receives
        if self._steered:
            # What the kernel dropped of the budgeted socket's (a flood's, mostly) unread.
            counts["udp_budgeted_dropped"] = self.bind.kernel_drops() or 0
        return counts

    def offloads(self) -> list[str]:
        """The offloads in force now, by name: TUN's (vnet_hdr, csum, tso4, ...), UDP's."""
        names = ["vnet_hdr", *self.tun.offloads] if self.tun.vnet_hdr else []
        if self.tun.coalescing:
            names.append("tun_coalescing")
        return names + self.bind.offloads()

    def publish_features(self) -> None:
        """Writes what is in force to the features file; at start and whenever it changes."""
        if self._features_path is None:
            return
        features = {"fast_path": self._fast_path, "offloads": self.offloads()}
        try:
            ipc.write_features(self._features_path, features)
        except OSError as exc:
            self.log.warning("features_file_unwritable", reason=exc.strerror)

    def _log_counters(self) -> None:
        counts = self.counters()
        if counts != self._last_counters:
            self.log.info("counters", **counts)
            self._last_counters = counts


def _endpoint(endpoint: actions_mod.Endpoint | None) -> str | None:
    return None if endpoint is None else uapi.format_endpoint(endpoint)
