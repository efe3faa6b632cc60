"""The send path: a packet from TUN to an encrypted datagram, and the handshake messages we send.

A packet is routed by its destination through allowed-ips and staged on its peer; staged
packets go out as soon as the peer has a current keypair young enough to send with, and the
first that lacks one starts a handshake instead (at most one initiation per rekey-timeout).
Each function appends to the caller's list of actions; the timer hooks are called where the
paper's rules say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from podwire.agent.engine import constants, cookie, fastpath, messages, noise, peer, timers
from podwire.agent.engine.actions import Action, Endpoint, SendDatagram
from podwire.agent.engine.counters import Drop

if TYPE_CHECKING:
    from podwire.agent.engine import device

# send_packets seals a peer's staged packets once this many wait, well before they overflow.
_FLUSH_AT = peer.MAX_STAGED_PACKETS // 2


def send_packet(dev: device.Device, packet: bytes, now: float) -> list[Action]:
    """An IP packet read from TUN: encrypt it for the peer that routes its destination."""
    actions: list[Action] = []
    target = _stage(dev, packet)
    if target is not None:
        send_staged(dev, target, now, actions)
    return actions


def send_alone(dev: device.Device, packet: bytes, now: float) -> tuple[bytes, Endpoint] | None:
    """A packet read alone from TUN (a ping, a request, an ACK in a quiet moment) in the common
    case: routed to a peer at the endpoint it was last seen at, with nothing staged before it
    and a current keypair that may send it without starting a handshake. The transport message
    and where it goes, sealed as send_packet would seal it, with the same counters and timers;
    None, with nothing changed, when any of that does not hold (send_packet then takes it and
    counts what it drops).

    One function, not send_packet's staging and batching: its round trip is the latency users
    see, and on a quiet engine each layer it crosses costs tens of microseconds of cold cache.
    """
    n = len(packet)
    version = packet[0] >> 4 if n else 0
    if version == 4 and n >= 20:
        destination = int.from_bytes(packet[16:20], "big")
        target = dev.allowed_ips.lookup_v4(destination)
    elif version == 6 and n >= 40:
        destination = int.from_bytes(packet[24:40], "big")
        target = dev.allowed_ips.lookup_v6(destination)
        destination |= peer.IPV6_TAG
    else:
        return None
    if target is None or target.staged:
        return None
    endpoint = target.endpoint
    keypair = target.current
    if (
        endpoint is None
        or endpoint != target.endpoint_seen
        or destination == target.endpoint_address
        or keypair is None
        or not keypair.sending_valid
    ):
        return None
    config = dev.timer_config
    counter = keypair.send_counter
    age = now - keypair.created
    if (
        age >= config.reject_after_time
        or counter >= config.reject_after_messages
        # What should_rekey_after_send would say once it is sent: send_packet's to handle.
        or counter + 1 > config.rekey_after_messages
        or (keypair.i_am_the_initiator and age >= config.rekey_after_time)
    ):
        return None
    keypair.send_counter = counter + 1
    data = fastpath.seal(keypair.sending, keypair.remote_index, counter, [packet], dev.mtu)[0]
    dev.counters.transport_sent += 1
    target.tx_bytes += len(data)
    t = target.timers
    t.on_any_authenticated_packet_traversal(now)
    t.on_any_authenticated_packet_sent(now)
    t.on_data_sent(now)
    return data, endpoint


def send_packets(dev: device.Device, packets: list[bytes], now: float) -> list[Action]:
    """Packets read from TUN together (the segments of a TSO burst, say): each is routed and
    staged as send_packet does, then each peer's are sealed in one pass, in order."""
    actions: list[Action] = []
    touched: dict[peer.Peer, None] = {}
    routes: dict[bytes, peer.Peer] = {}
    for packet in packets:
        target = _stage(dev, packet, routes)
        if target is None:
            continue
        touched[target] = None
        if len(target.staged) >= _FLUSH_AT:
            send_staged(dev, target, now, actions)
    for target in touched:
        if target.staged:
            send_staged(dev, target, now, actions)
    return actions


def _stage(
    dev: device.Device, packet: bytes, routes: dict[bytes, peer.Peer] | None = None
) -> peer.Peer | None:
    """Queues packet on the peer that routes its destination; None if it was dropped.

    routes remembers, for one batch, the destinations already found good and their peer: the
    routing table and the peers' endpoints do not change within a batch, so the next packet to
    the same address (the segments of a TSO burst) skips the lookup and the checks."""
    n = len(packet)
    version = packet[0] >> 4 if n else 0
    if version == 4 and n >= 20:
        key = packet[16:20]
    elif version == 6 and n >= 40:
        key = packet[24:40]
    else:
        dev.counters.drops[Drop.BAD_IP_PACKET] += 1
        return None
    if routes is not None:
        known = routes.get(key)
        if known is not None:
            if not known.stage(bytes(packet)):
                dev.counters.drops[Drop.STAGED_OVERFLOW] += 1
            return known
    destination = int.from_bytes(key, "big")
    if version == 4:
        target = dev.allowed_ips.lookup_v4(destination)
    else:
        target = dev.allowed_ips.lookup_v6(destination)
        destination |= peer.IPV6_TAG
    if target is None:
        dev.counters.drops[Drop.NO_ROUTE] += 1
        return None
    endpoint = target.endpoint
    if endpoint is None:
        dev.counters.drops[Drop.NO_ENDPOINT] += 1
        return None
    if endpoint != target.endpoint_seen:
        target.see_endpoint(endpoint)
    if destination == target.endpoint_address:
        # A route sends the peer's own endpoint into the tunnel: encapsulating would loop.
        dev.counters.drops[Drop.ROUTING_LOOP] += 1
        target.routing_loops += 1
        return None
    if routes is not None:
        routes[key] = target
    if not target.stage(bytes(packet)):
        dev.counters.drops[Drop.STAGED_OVERFLOW] += 1
    return target


def send_staged(dev: device.Device, p: peer.Peer, now: float, actions: list[Action]) -> None:
    """Encrypt what waits for the peer, or start a handshake if no key may send it."""
    keypair = p.current
    config = dev.timer_config
    if (
        keypair is None
        or not keypair.sending_valid
        or not timers.can_send_with(keypair, now, config)
    ):
        send_initiation(dev, p, now, actions, retry=False)
        return
    staged = p.staged
    sent = data_sent = False
    try:
        while staged:
            room = config.reject_after_messages - keypair.send_counter
            if room <= 0:
                keypair.sending_valid = False
                send_initiation(dev, p, now, actions, retry=False)
                return
            batch = [staged.popleft() for _ in range(min(room, len(staged)))]
            data_sent |= _encrypt(dev, p, keypair, batch, actions)
            sent = True
    finally:
        # The timers hear of the pass once: every packet in it went at the same `now`.
        if sent:
            t = p.timers
            t.on_any_authenticated_packet_traversal(now)
            t.on_any_authenticated_packet_sent(now)
            if data_sent:
                t.on_data_sent(now)
    if timers.should_rekey_after_send(keypair, now, config):
        send_initiation(dev, p, now, actions, retry=False)


def send_keepalive(dev: device.Device, p: peer.Peer, now: float, actions: list[Action]) -> None:
    """An empty transport message, unless data already waits to go (it serves as well)."""
    if not p.staged:
        p.staged.append(b"")
    send_staged(dev, p, now, actions)


def _encrypt(
    dev: device.Device,
    p: peer.Peer,
    keypair: noise.Keypair,
    packets: list[bytes],
    actions: list[Action],
) -> bool:
    """Seals packets as the next transport messages, in one call to the fast path in force;
    True if any carried data (not a keepalive). The caller tells the timers."""
    counter = keypair.send_counter
    keypair.send_counter = counter + len(packets)
    sealed = fastpath.seal(keypair.sending, keypair.remote_index, counter, packets, dev.mtu)
    keepalives = packets.count(b"")
    counters = dev.counters
    counters.transport_sent += len(packets) - keepalives
    counters.keepalives_sent += keepalives
    endpoint = p.endpoint
    if endpoint is None:
        counters.drops[Drop.NO_ENDPOINT] += len(sealed)
    else:
        p.tx_bytes += sum(map(len, sealed))
        actions += [SendDatagram(data, endpoint) for data in sealed]
    return keepalives < len(packets)


def _emit(dev: device.Device, p: peer.Peer, data: bytes, actions: list[Action]) -> None:
    endpoint = p.endpoint
    if endpoint is None:
        dev.counters.drops[Drop.NO_ENDPOINT] += 1
        return
    p.tx_bytes += len(data)
    actions.append(SendDatagram(data, endpoint))


def send_initiation(
    dev: device.Device, p: peer.Peer, now: float, actions: list[Action], *, retry: bool
) -> None:
    """Start a handshake; `retry` when the retransmit timer asks, so its attempts add up."""
    if not retry:
        p.timers.handshake_attempts = 0
    last = p.last_sent_handshake
    if last is not None and now - last < dev.timer_config.rekey_timeout:
        return  # one initiation per rekey-timeout at most
    identity = dev.identity
    if identity is None:
        dev.counters.drops[Drop.NO_IDENTITY] += 1
        return
    p.last_sent_handshake = now
    dev.index.forget_handshake(p)
    index = dev.index.new_index()
    try:
        message = noise.create_initiation(
            p.handshake,
            identity,
            ephemeral_private=dev.rng(constants.KEY_LEN),
            sender_index=index,
            wall_time=dev.wall_clock(),
        )
    except noise.HandshakeError as exc:
        dev.counters.drops[exc.reason] += 1
        return
    dev.index.announce_handshake(p, index)
    data = p.cookie.stamp(message.pack(), now=now)
    p.timers.on_any_authenticated_packet_traversal(now)
    p.timers.on_any_authenticated_packet_sent(now)
    dev.counters.initiations_sent += 1
    _emit(dev, p, data, actions)
    p.timers.on_handshake_initiated(now)


def send_response(dev: device.Device, p: peer.Peer, now: float, actions: list[Action]) -> None:
    """Answer the initiation just consumed; the responder's keypair is derived at once."""
    index = dev.index.new_index()
    try:
        message = noise.create_response(
            p.handshake, ephemeral_private=dev.rng(constants.KEY_LEN), sender_index=index
        )
    except noise.HandshakeError as exc:
        dev.counters.drops[exc.reason] += 1
        return
    data = p.cookie.stamp(message.pack(), now=now)
    dev.begin_session(p, now)
    p.timers.on_any_authenticated_packet_traversal(now)
    p.timers.on_any_authenticated_packet_sent(now)
    p.last_sent_handshake = now
    dev.counters.responses_sent += 1
    _emit(dev, p, data, actions)


def send_cookie_reply(
    dev: device.Device,
    checker: cookie.CookieChecker,
    data: bytes,
    source: Endpoint,
    now: float,
    actions: list[Action],
) -> None:
    """Under load, answer a handshake message that lacks a valid mac2 with a cookie, from the
    checker of the identity it addresses (its cookie key is what the sender opens it with)."""
    sender = messages.TYPE.unpack_from(data, 4)[0]
    reply = checker.create_reply(data, sender, source, now=now, rng=dev.rng)
    dev.counters.cookie_replies_sent += 1
    actions.append(SendDatagram(reply.pack(), source))
