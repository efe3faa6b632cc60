"""The index table: what a receiver index names, a handshake in flight or a keypair.

Every handshake message we send announces a fresh random 32-bit index, and the peer puts it in
the receiver field of all it sends back: a response or a cookie reply names a handshake in
flight, a transport message names a keypair. An index belongs to one of them at a time and is
freed when its handshake is replaced or wiped, or its keypair dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from podwire.agent.engine import noise, peer


class IndexTable:
    def __init__(self, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self._handshakes: dict[int, peer.Peer] = {}
        self._keypairs: dict[int, tuple[noise.Keypair, peer.Peer]] = {}
        # Lookups by a message's receiver index; the keypair's runs once per transport packet.
        self.handshake: Callable[[int], peer.Peer | None] = self._handshakes.get
        self.keypair: Callable[[int], tuple[noise.Keypair, peer.Peer] | None] = self._keypairs.get

    def new_index(self) -> int:
        """A random index that names nothing yet."""
        while True:
            index = int.from_bytes(self._rng(4), "little")
            if index not in self._handshakes and index not in self._keypairs:
                return index

    def peer_of(self, index: int) -> peer.Peer | None:
        """The peer whose handshake or keypair the index names (what a cookie reply answers)."""
        p = self._handshakes.get(index)
        if p is None:
            entry = self._keypairs.get(index)
            p = entry[1] if entry is not None else None
        return p

    def announce_handshake(self, p: peer.Peer, index: int) -> None:
        """Call once the initiation that carries `index` is made."""
        p.handshake_index = index
        self._handshakes[index] = p

    def forget_handshake(self, p: peer.Peer) -> None:
        """Retire the index of the handshake in flight (its state is replaced or wiped)."""
        index = p.handshake_index
        if index is not None:
            if self._handshakes.get(index) is p:
                del self._handshakes[index]
            p.handshake_index = None

    def add_keypair(self, keypair: noise.Keypair, p: peer.Peer) -> None:
        self._keypairs[keypair.local_index] = (keypair, p)

    def drop_keypairs(self, keypairs: list[noise.Keypair]) -> None:
        """Invalidate the keypairs and free their indices."""
        for keypair in keypairs:
            keypair.sending_valid = keypair.receiving_valid = False
            entry = self._keypairs.get(keypair.local_index)
            if entry is not None and entry[0] is keypair:
                del self._keypairs[keypair.local_index]
