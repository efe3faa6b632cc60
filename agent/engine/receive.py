"""The receive path: a datagram from UDP to a packet for TUN, and the handshake messages we
consume.

Whatever a peer sends is dispatched on its type and length first; a handshake message must
then pass mac1 (and under load mac2 and the rate limit) before any Diffie-Hellman; a transport
message must name a live keypair, authenticate and not be a replay. Only then does the peer
roam to the datagram's source and do its timers hear of it. A decrypted packet is delivered
only if its source address is one of the peer's allowed-ips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from podwire.agent.engine import constants, cookie, fastpath, messages, noise, peer, send, timers
from podwire.agent.engine.actions import Action, DeliverPacket, Endpoint
from podwire.agent.engine.counters import Drop

if TYPE_CHECKING:
    from podwire.agent.engine import device

_TYPE = messages.TYPE
_HEADER = messages.TRANSPORT_HEADER
_TRANSPORT = constants.MESSAGE_TRANSPORT


def receive_datagram(dev: device.Device, data: bytes, source: Endpoint, now: float) -> list[Action]:
    """A datagram from the UDP socket. Never raises."""
    try:
        if len(data) < 4:
            dev.counters.drops[Drop.SHORT] += 1
            return []
        kind = _TYPE.unpack_from(data)[0]
        if kind == _TRANSPORT:
            actions: list[Action] = []
            _receive_transport(dev, data, source, now, actions)
            return actions
        if kind == constants.MESSAGE_INITIATION:
            return _receive_initiation(dev, data, source, now)
        if kind == constants.MESSAGE_RESPONSE:
            return _receive_response(dev, data, source, now)
        if kind == constants.MESSAGE_COOKIE_REPLY:
            return _receive_cookie_reply(dev, data, now)
        dev.counters.drops[Drop.UNKNOWN_TYPE] += 1
        return []
    except Exception:
        # A bug, not a peer's fault; counted so tests and logs see it, never fatal.
        dev.counters.drops[Drop.INTERNAL_ERROR] += 1
        return []


def receive_alone(dev: device.Device, data: bytes, source: Endpoint, now: float) -> bytes | None:
    """A datagram read alone (a ping's, a request's, in a quiet moment) in the common case: a
    transport message of an established session, carrying an IP packet from one of the peer's
    allowed-ips, that neither confirms a new keypair nor calls for the last-minute handshake.
    The packet to deliver, with the same counters, endpoint and timers receive_datagram would
    leave; None, with nothing changed, when any of that does not hold (receive_datagram then
    takes the datagram and counts what it drops). Never raises.

    One function, as send_alone: after a quiet moment each layer costs tens of microseconds
    of cold cache, and this is half of every round trip. Everything that may decline comes
    before the replay window records the counter, the one step that cannot be taken back.
    """
    try:
        n = len(data)
        if n < constants.TRANSPORT_MIN_LEN or data[0] != _TRANSPORT or data[1] | data[2] | data[3]:
            return None
        _, receiver, counter = _HEADER.unpack_from(data)
        entry = dev.index.keypair(receiver)
        if entry is None:
            return None
        keypair, p = entry
        config = dev.timer_config
        if (
            p.next is keypair
            or not keypair.receiving_valid
            or now - keypair.created >= config.reject_after_time
            or counter >= config.reject_after_messages
        ):
            return None
        t = p.timers
        current = p.current
        if (
            current is not None
            and not t.sent_lastminute_handshake
            and current.sending_valid
            and timers.should_rekey_after_receive(current, now, config)
        ):
            return None
        plain = fastpath.open([keypair.receiving], [data])[0]
        if not plain:  # not authentic, or a keepalive
            return None
        m = len(plain)
        version = plain[0] >> 4
        if version == 4 and m >= 20:
            length = (plain[2] << 8) | plain[3]
            if length < 20 or length > m:
                return None
            routed = dev.allowed_ips.lookup_v4(int.from_bytes(plain[12:16], "big"))
        elif version == 6 and m >= 40:
            length = 40 + ((plain[4] << 8) | plain[5])
            if length > m:
                return None
            routed = dev.allowed_ips.lookup_v6(int.from_bytes(plain[8:24], "big"))
        else:
            return None
        if routed is not p or not keypair.replay.validate(counter, config.reject_after_messages):
            return None
        p.endpoint = source
        p.rx_bytes += n
        counters = dev.counters
        counters.transport_received += 1
        t.on_any_authenticated_packet_received(now)
        t.on_any_authenticated_packet_traversal(now)
        t.on_data_received(now)
        counters.packets_delivered += 1
        return plain if length == m else plain[:length]
    except Exception:
        # A bug, not a peer's fault (as in receive_datagram): counted, never fatal; the long
        # way then takes the datagram and meets what it meets.
        dev.counters.drops[Drop.INTERNAL_ERROR] += 1
        return None


def receive_datagrams(
    dev: device.Device, datagrams: list[tuple[bytes, Endpoint]], now: float
) -> list[Action]:
    """Datagrams read together, each as receive_datagram takes it, except that the timers of
    a peer whose transport messages only carry data hear of them once for the batch (they all
    came at the same `now`); before anything of that peer's that sends, they hear at once, so
    they see events in the order one-by-one would show them. Never raises."""
    actions: list[Action] = []
    deferred: dict[peer.Peer, int] = {}
    try:
        opened = _open_batch(dev, datagrams)
    except Exception:
        dev.counters.drops[Drop.INTERNAL_ERROR] += 1
        opened = [None] * len(datagrams)
    sources: dict[bytes, peer.Peer | None] = {}
    for (data, source), pre in zip(datagrams, opened, strict=True):
        try:
            if len(data) >= 4 and data[0] == _TRANSPORT and not data[1] | data[2] | data[3]:
                _receive_transport(dev, data, source, now, actions, deferred, pre, sources)
                continue
            _tell_timers(deferred, now)
        except Exception:
            dev.counters.drops[Drop.INTERNAL_ERROR] += 1
            continue
        actions += receive_datagram(dev, data, source, now)
    try:
        _tell_timers(deferred, now)
    except Exception:
        dev.counters.drops[Drop.INTERNAL_ERROR] += 1
    return actions


# What _open_batch found for one datagram: the keypair it was opened with and its plaintext
# (None: it did not authenticate).
_Opened = tuple[noise.Keypair, bytes | None]


def _open_batch(
    dev: device.Device, datagrams: list[tuple[bytes, Endpoint]]
) -> list[_Opened | None]:
    """The batch's transport messages opened in one call to the fast path, each with the
    keypair its receiver index names now. Only bytes are computed here: whether a keypair may
    still receive, the replay window and the timers are judged as each is taken in turn."""
    found: list[_Opened | None] = [None] * len(datagrams)
    where: list[int] = []
    keypairs: list[noise.Keypair] = []
    lookup = dev.index.keypair
    unpack = _HEADER.unpack_from
    for i, (data, _) in enumerate(datagrams):
        if len(data) < constants.TRANSPORT_MIN_LEN or data[0] != _TRANSPORT:
            continue
        kind, receiver, _counter = unpack(data)
        entry = lookup(receiver) if kind == _TRANSPORT else None
        if entry is not None and entry[0].receiving_valid:
            where.append(i)
            keypairs.append(entry[0])
    if where:
        plains = fastpath.open([k.receiving for k in keypairs], [datagrams[i][0] for i in where])
        for i, keypair, plain in zip(where, keypairs, plains, strict=True):
            found[i] = (keypair, plain)
    return found


def _tell_timers(deferred: dict[peer.Peer, int], now: float, only: peer.Peer | None = None) -> None:
    """What the timers of the peers in deferred (or of `only`) were not told yet: transport
    messages received, and how many carried data (two tell on_data_received all that more do)."""
    for p in [only] if only is not None else list(deferred):
        if p not in deferred:
            continue
        data_packets = deferred.pop(p)
        t = p.timers
        t.on_any_authenticated_packet_received(now)
        t.on_any_authenticated_packet_traversal(now)
        for _ in range(min(data_packets, 2)):
            t.on_data_received(now)


def _receive_transport(
    dev: device.Device,
    data: bytes,
    source: Endpoint,
    now: float,
    actions: list[Action],
    deferred: dict[peer.Peer, int] | None = None,
    opened: _Opened | None = None,
    sources: dict[bytes, peer.Peer | None] | None = None,
) -> None:
    """A transport message, its actions appended to actions; `opened`, what _open_batch made
    of it, if anything; `sources`, the batch's memo for _check_inner_packet."""
    n = len(data)
    if n < constants.TRANSPORT_MIN_LEN:
        dev.counters.drops[Drop.BAD_LENGTH] += 1
        return
    _, receiver, counter = _HEADER.unpack_from(data)
    entry = dev.index.keypair(receiver)
    if entry is None:
        dev.counters.drops[Drop.UNKNOWN_RECEIVER] += 1
        return
    keypair, p = entry
    config = dev.timer_config
    if (
        not keypair.receiving_valid
        or now - keypair.created >= config.reject_after_time
        or counter >= config.reject_after_messages
    ):
        dev.counters.drops[Drop.KEY_EXPIRED] += 1
        return
    if opened is not None and opened[0] is keypair:
        plain = opened[1]
    else:
        plain = fastpath.open([keypair.receiving], [data])[0]
    if plain is None:
        dev.counters.drops[Drop.BAD_AEAD] += 1
        return
    if not keypair.replay.validate(counter, config.reject_after_messages):
        dev.counters.drops[Drop.REPLAYED] += 1
        return

    # Authenticated: the peer roams to wherever this came from.
    p.endpoint = source
    p.rx_bytes += n
    dev.counters.transport_received += 1
    if p.next is keypair:
        if deferred:
            _tell_timers(deferred, now, p)
        _confirm_next(dev, p, keypair, now, actions)
    current = p.current
    if (
        current is not None
        and not p.timers.sent_lastminute_handshake
        and current.sending_valid
        and timers.should_rekey_after_receive(current, now, config)
    ):
        if deferred:
            _tell_timers(deferred, now, p)
        p.timers.sent_lastminute_handshake = True
        send.send_initiation(dev, p, now, actions, retry=False)
    if deferred is not None:
        deferred[p] = deferred.get(p, 0) + (1 if plain else 0)
    else:
        p.timers.on_any_authenticated_packet_received(now)
        p.timers.on_any_authenticated_packet_traversal(now)
    if not plain:
        dev.counters.keepalives_received += 1
        return
    if deferred is None:
        p.timers.on_data_received(now)
    packet = _check_inner_packet(dev, plain, p, sources)
    if packet is not None:
        dev.counters.packets_delivered += 1
        actions.append(DeliverPacket(packet))


def _check_inner_packet(
    dev: device.Device,
    plain: bytes,
    p: peer.Peer,
    sources: dict[bytes, peer.Peer | None] | None = None,
) -> bytes | None:
    """The packet without padding if it is IP and its source is one of the peer's. sources
    remembers, for one batch, the peer that routes each source address seen (the allowed-ips
    do not change within a batch)."""
    n = len(plain)
    version = plain[0] >> 4
    if version == 4 and n >= 20:
        length = (plain[2] << 8) | plain[3]
        key = plain[12:16]
        lookup = dev.allowed_ips.lookup_v4
    elif version == 6 and n >= 40:
        length = 40 + ((plain[4] << 8) | plain[5])
        key = plain[8:24]
        lookup = dev.allowed_ips.lookup_v6
    else:
        dev.counters.drops[Drop.BAD_IP_PACKET] += 1
        return None
    if length > n or (version == 4 and length < 20):
        dev.counters.drops[Drop.BAD_IP_PACKET] += 1
        return None
    if sources is None:
        routed = lookup(int.from_bytes(key, "big"))
    elif key in sources:
        routed = sources[key]
    else:
        routed = sources[key] = lookup(int.from_bytes(key, "big"))
    if routed is not p:
        dev.counters.drops[Drop.BAD_SOURCE_ADDRESS] += 1
        return None
    return plain if length == n else plain[:length]


def _confirm_next(
    dev: device.Device, p: peer.Peer, keypair: noise.Keypair, now: float, actions: list[Action]
) -> None:
    """The initiator used our responder keypair: it becomes current; send what waited."""
    _, dropped = p.received_with_keypair(keypair)
    if dropped is not None:
        dev.index.drop_keypairs([dropped])
    p.timers.on_handshake_complete(now)
    p.last_handshake_wall = dev.wall_clock()
    dev.counters.handshakes_completed += 1
    send.send_staged(dev, p, now, actions)


def _addressed_identity(
    dev: device.Device, data: bytes, source: Endpoint, now: float, actions: list[Action]
) -> noise.StaticIdentity | None:
    """Which of our identities the message's mac1 is keyed for: the current one, else the
    previous one during its grace. Under load, the source's rate first, then mac2 (else a
    cookie reply, keyed for the identity addressed). None: drop it.

    Under load the rate limit comes before the MACs (the kernel checks it after mac2): every
    handshake message a source sends spends from its budget, so most of a flood is refused for
    the price of a dictionary lookup, and cookie replies, which cost this engine more than they
    cost a kernel, go out at most at the limiter's rate to any one source.
    """
    under_load = dev.under_load
    if under_load and not dev.ratelimiter.allow(source[0], now):
        dev.counters.drops[Drop.RATE_LIMITED] += 1
        return None
    checker, identity = dev.checker, dev.identity
    check = checker.check(data, source, check_mac2=under_load, now=now, rng=dev.rng)
    if check is cookie.MacCheck.INVALID:
        previous = dev.previous_identity(now)
        if previous is not None:
            checker, identity = previous.checker, previous.identity
            check = checker.check(data, source, check_mac2=under_load, now=now, rng=dev.rng)
    if check is cookie.MacCheck.INVALID:
        dev.counters.drops[Drop.BAD_MAC1] += 1
        return None
    if under_load and check is cookie.MacCheck.VALID_MAC1:
        dev.counters.drops[Drop.BAD_MAC2_NEEDS_COOKIE] += 1
        send.send_cookie_reply(dev, checker, data, source, now, actions)
        return None
    if identity is None:
        dev.counters.drops[Drop.NO_IDENTITY] += 1
    return identity


def _admit(
    dev: device.Device, data: bytes, source: Endpoint, now: float, length: int
) -> tuple[list[Action], noise.StaticIdentity | None]:
    """The checks a handshake message passes before any Diffie-Hellman is spent on it.

    Its length, its MACs (a cookie reply instead, under load), the source's rate, and the
    identity of ours it addresses, to answer with. None for the identity: drop it (the actions
    so far, a cookie reply perhaps, still go out).
    """
    actions: list[Action] = []
    dev.handshake_messages += 1
    if len(data) != length:
        dev.counters.drops[Drop.BAD_LENGTH] += 1
        return actions, None
    return actions, _addressed_identity(dev, data, source, now, actions)


def _receive_initiation(
    dev: device.Device, data: bytes, source: Endpoint, now: float
) -> list[Action]:
    actions, identity = _admit(dev, data, source, now, constants.INITIATION_LEN)
    if identity is None:
        return actions
    message = messages.parse_initiation(data)
    try:
        handshake = noise.consume_initiation(message, identity, dev.find_handshake, now=now)
    except noise.HandshakeError as exc:
        dev.counters.drops[exc.reason] += 1
        return actions
    p = dev.peers[handshake.remote_static]
    dev.counters.initiations_received += 1
    if identity is not dev.identity:
        dev.counters.previous_key_handshakes += 1
    p.rx_bytes += len(data)
    p.endpoint = source
    dev.index.forget_handshake(p)
    send.send_response(dev, p, now, actions)
    p.timers.on_any_authenticated_packet_received(now)
    p.timers.on_any_authenticated_packet_traversal(now)
    return actions


def _receive_response(
    dev: device.Device, data: bytes, source: Endpoint, now: float
) -> list[Action]:
    actions, identity = _admit(dev, data, source, now, constants.RESPONSE_LEN)
    if identity is None:
        return actions
    message = messages.parse_response(data)
    p = dev.index.handshake(message.receiver)
    if p is None:
        dev.counters.drops[Drop.UNKNOWN_RECEIVER] += 1
        return actions
    try:
        noise.consume_response(message, p.handshake, identity)
    except noise.HandshakeError as exc:
        dev.counters.drops[exc.reason] += 1
        return actions
    dev.counters.responses_received += 1
    if identity is not dev.identity:
        dev.counters.previous_key_handshakes += 1
    p.rx_bytes += len(data)
    p.endpoint = source
    dev.begin_session(p, now)
    p.timers.on_handshake_complete(now)
    p.last_handshake_wall = dev.wall_clock()
    dev.counters.handshakes_completed += 1
    p.timers.on_any_authenticated_packet_received(now)
    p.timers.on_any_authenticated_packet_traversal(now)
    # Confirms the session to the responder: queued data if any, else a keepalive.
    send.send_keepalive(dev, p, now, actions)
    return actions


def _receive_cookie_reply(dev: device.Device, data: bytes, now: float) -> list[Action]:
    if len(data) != constants.COOKIE_REPLY_LEN:
        dev.counters.drops[Drop.BAD_LENGTH] += 1
        return []
    reply = messages.parse_cookie_reply(data)
    p = dev.index.peer_of(reply.receiver)
    if p is None:
        dev.counters.drops[Drop.UNKNOWN_RECEIVER] += 1
        return []
    if not p.cookie.consume_reply(reply, now=now):
        dev.counters.drops[Drop.BAD_COOKIE_REPLY] += 1
        return []
    # The retransmit timer resends the initiation, now with mac2.
    dev.counters.cookie_replies_received += 1
    return []
