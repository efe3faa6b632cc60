"""TCP and UDP traffic between pods, with a payload the underlay capture can look for.

Run inside a pod's namespace (`ip netns exec POD python -m podwire.sandbox.probe ...`):

    serve PORT                 echo every TCP connection and UDP datagram on PORT
    send tcp|udp HOST PORT PAYLOAD
                               send PAYLOAD, exit 0 once it comes back unchanged

The pods have no tools of their own (they are bare namespaces), so the sandbox brings these.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from collections.abc import Sequence

TIMEOUT = 5.0
UDP_TRIES = 5


def serve(port: int) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    threading.Thread(target=_udp_echo, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=_tcp_echo, args=(conn,), daemon=True).start()


def _udp_echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def _tcp_echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def send(proto: str, host: str, port: int, payload: bytes) -> bool:
    if proto == "tcp":
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return got == payload
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT / UDP_TRIES)
        for _ in range(UDP_TRIES):  # UDP may lose the first datagram to a handshake
            s.sendto(payload, (host, port))
            try:
                if s.recv(65536) == payload:
                    return True
            except TimeoutError:
                continue
    return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podwire-sandbox-probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("port", type=int)
    sd = sub.add_parser("send")
    sd.add_argument("proto", choices=["tcp", "udp"])
    sd.add_argument("host")
    sd.add_argument("port", type=int)
    sd.add_argument("payload")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port)
        return 0
    try:
        ok = send(args.proto, args.host, args.port, args.payload.encode())
    except OSError as e:
        print(f"{args.proto} to {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
