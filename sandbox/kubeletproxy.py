"""The apiserver's way to the sandbox's kubelets, for `kubectl logs`, `exec` and `port-forward`.

The apiserver listens on the host's loopback; each kubelet serves on its node's underlay
address, inside the node's network namespace, which the host cannot route to (the sandbox puts
no address on the machine's interfaces). The apiserver's egress selector sends its connections
to the cluster (the kubelets) through an HTTP CONNECT proxy on a unix socket; this is that
proxy. For `CONNECT <address>:<port>` it connects from inside the network namespace of the
node that owns the address, then relays bytes both ways. TLS runs end to end between the
apiserver and the kubelet: the proxy sees only ciphertext. An address that is no node's is
refused (403), so the proxy reaches nothing else; the socket is root's alone (0600).

The nodes are read, at each CONNECT, from a JSON file ({"192.0.2.11": "<netns>", ...}) that the
sandbox writes once the nodes' namespaces exist: the proxy starts before the apiserver that is
told about it.

Run: python -m podwire.sandbox.kubeletproxy --socket PATH --nodes FILE   (prints `ready`)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pathlib
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from podwire.sandbox import apiproxy

CLONE_NEWNET = 0x40000000
HEADER_LIMIT = 8192  # a CONNECT request and its headers; anything longer is refused
CONNECT_TIMEOUT = 10.0
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def connect_in(netns: str, address: str, port: int) -> socket.socket:
    """A TCP connection to address:port made from inside netns; this thread comes back home."""
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _setns(home)  # the socket stays in netns; the thread does not
    finally:
        os.close(target)
        os.close(home)
    try:
        s.settimeout(CONNECT_TIMEOUT)
        s.connect((address, port))
        s.settimeout(None)
    except OSError:
        s.close()
        raise
    return s


def read_request(client: socket.socket) -> tuple[str, int, bytes]:
    """(host, port, bytes read past the headers) of a CONNECT request; ValueError if it is none."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        if not chunk:
            raise ValueError("the client closed before its request ended")
        data += chunk
        if len(data) > HEADER_LIMIT:
            raise ValueError("request headers too long")
    head, _, rest = data.partition(b"\r\n\r\n")
    method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if method != "CONNECT":
        raise ValueError(f"{method} is not CONNECT")
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port), rest


def read_nodes(path: pathlib.Path) -> dict[str, str]:
    """The nodes' addresses and namespaces; none while the file is not written yet."""
    try:
        nodes = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in nodes.items()} if isinstance(nodes, dict) else {}


def write_nodes(path: pathlib.Path, nodes: dict[str, str]) -> None:
    """Written atomically: the proxy may read it at any moment."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(nodes))
    tmp.rename(path)


def handle(client: socket.socket, nodes_file: pathlib.Path) -> None:
    """One CONNECT: to a node's address from that node's namespace, or refused. A client that
    sends nothing, or garbage, or goes away, ends only its own connection."""
    with client:
        try:
            client.settimeout(CONNECT_TIMEOUT)
            _answer(client, nodes_file)
        except OSError:
            pass


def _answer(client: socket.socket, nodes_file: pathlib.Path) -> None:
    try:
        host, port, rest = read_request(client)
    except (ValueError, UnicodeDecodeError):
        client.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        return
    netns = read_nodes(nodes_file).get(host)
    if netns is None:
        client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\nnot a sandbox node's address\n")
        return
    try:
        upstream = connect_in(netns, host, port)
    except (OSError, OverflowError) as e:
        client.sendall(f"HTTP/1.1 502 Bad Gateway\r\n\r\n{e}\n".encode())
        return
    client.settimeout(None)
    with upstream:
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        back = threading.Thread(target=apiproxy.pipe, args=(upstream, client), daemon=True)
        back.start()
        apiproxy.pipe(client, upstream)
        back.join()


def serve(listener: socket.socket, nodes_file: pathlib.Path) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, nodes_file), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podwire-sandbox-kubeletproxy")
    p.add_argument("--socket", type=pathlib.Path, required=True,
                   help="the unix socket to listen on (under 108 bytes: the apiserver dials it)")  # fmt: skip
    p.add_argument("--nodes", type=pathlib.Path, required=True,
                   help="JSON file: each kubelet's address and its node's namespace")  # fmt: skip
    args = p.parse_args(argv)
    old_umask = os.umask(0o177)  # the socket is made 0600: the apiserver runs as root
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(args.socket))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    serve(listener, args.nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
