"""The engine's poller over epoll, on real socket pairs: what is ready comes back with its
callback and the events it was watched for; a hang-up wakes a reader; a modified or
unregistered descriptor is watched as it now says."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from podwire.agent.engine import poller


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def _named(name: str) -> poller.Callback:
    def callback(mask: int) -> None:
        raise AssertionError(f"{name} was called by the poller itself")

    callback.__name__ = name
    return callback


def test_what_is_ready_comes_back_with_its_callback_and_events(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    p = poller.Poller()
    on_ours = _named("ours")
    p.register(ours, poller.READ | poller.WRITE, on_ours)
    # Writable at once, not readable until the other end writes.
    assert p.poll(0) == [(on_ours, poller.WRITE)]
    theirs.send(b"x")
    assert p.poll(1) == [(on_ours, poller.READ | poller.WRITE)]
    p.modify(ours, poller.READ)
    assert p.poll(0) == [(on_ours, poller.READ)]
    assert p.events(ours) == poller.READ
    p.close()


def test_nothing_ready_waits_out_the_timeout_and_returns_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    p = poller.Poller()
    p.register(ours.fileno(), poller.READ, _named("ours"))
    start = time.monotonic()
    assert p.poll(0.05) == []
    assert time.monotonic() - start >= 0.045
    p.close()


def test_a_hang_up_wakes_a_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    p = poller.Poller()
    on_ours = _named("ours")
    p.register(ours, poller.READ, on_ours)
    theirs.close()
    assert p.poll(1) == [(on_ours, poller.READ)]
    assert ours.recv(10) == b""  # the read says what happened
    p.close()


def test_an_unregistered_descriptor_is_not_watched_and_can_be_registered_again(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    p = poller.Poller()
    p.register(ours, poller.READ, _named("first"))
    with pytest.raises(KeyError):
        p.register(ours, poller.READ, _named("again"))
    p.unregister(ours)
    assert ours not in p
    theirs.send(b"x")
    assert p.poll(0) == []
    second = _named("second")
    p.register(ours, poller.READ, second)
    assert ours in p
    assert p.poll(0) == [(second, poller.READ)]
    p.close()
