"""Lets agents in node namespaces reach the apiserver on the host's loopback.

In a cluster the agent runs in the node's network namespace and reaches the apiserver over the
node's network. Here the apiserver listens on the host's loopback, which a node namespace
cannot see, and the sandbox must not put addresses on the host's interfaces. So this small
forwarder listens on 127.0.0.1:PORT inside each node namespace and relays every connection to
127.0.0.1:PORT on the host: the kubeconfig and the apiserver's certificate work unchanged, and
no packet leaves a loopback.

Run: python -m podwire.sandbox.apiproxy --port PORT NETNS [NETNS ...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def listen_in(netns: str, port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port inside netns; this thread comes back home after."""
    home = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{netns}")
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(64)
        finally:
            if _libc.setns(home_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the host's namespace")
    finally:
        os.close(home_fd)
    return s


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copies a to b until a ends, then shuts both down (one direction of a relay)."""
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
    t.start()
    pipe(client, upstream)
    t.join()
    client.close()
    upstream.close()


def serve(listeners: Sequence[socket.socket], port: int) -> None:
    sel = selectors.DefaultSelector()
    for s in listeners:
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            conn, _addr = key.fileobj.accept()  # type: ignore[union-attr]
            threading.Thread(target=_relay, args=(conn, port), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podwire-sandbox-apiproxy")
    p.add_argument(
        "--port", type=int, required=True, help="the apiserver's port on the host's loopback"
    )
    p.add_argument("netns", nargs="+", help="node namespaces to serve")
    args = p.parse_args(argv)
    listeners = [listen_in(ns, args.port) for ns in args.netns]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    serve(listeners, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
