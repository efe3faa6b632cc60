"""The agent's local gRPC API on a unix socket (mode 0600), for the `podwire` CLI.

It reports what the controller knows and what the device says; it never carries a key other
than public ones. A request it cannot serve gets a gRPC status with a message, never a crash.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pathlib
import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from podwire.agent import controller as controller_mod
from podwire.agent import events as events_mod
from podwire.api.podwire.v1 import agent_pb2, agent_pb2_grpc

DATAPATHS = {"kernel": agent_pb2.DATAPATH_KERNEL, "userspace": agent_pb2.DATAPATH_USERSPACE}


def _ts(wall: float | None) -> timestamp_pb2.Timestamp | None:
    if not wall:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(wall * 1e9))
    return t


class Servicer(agent_pb2_grpc.AgentServicer):
    def __init__(
        self,
        ctl: controller_mod.Controller,
        *,
        peer_stats: Callable[[], list[Any]],
        broadcaster: events_mod.Broadcaster,
        rotate: Callable[[], tuple[str, float]],
    ) -> None:
        self.ctl = ctl
        self.peer_stats = peer_stats
        self.broadcaster = broadcaster
        self.rotate = rotate

    def GetStatus(self, request: Any, context: Any) -> agent_pb2.Status:
        st = self.ctl.state
        return agent_pb2.Status(
            node_name=st.node,
            public_key=st.public_key,
            listen_port=self.ctl.cfg.listen_port,
            datapath=DATAPATHS.get(st.datapath, agent_pb2.DATAPATH_UNSPECIFIED),
            device=self.ctl.cfg.device,
            features=list(st.features),
            nodes_synced=st.nodes_synced,
            wgnodes_synced=st.wgnodes_synced,
            last_reconcile=_ts(st.last_reconcile_wall),
            last_reconcile_error=st.last_reconcile_error,
            peer_count=len(st.peers),
        )

    def ListPeers(self, request: Any, context: Any) -> agent_pb2.ListPeersResponse:
        names = {p.public_key: p.node for p in self.ctl.state.peers}
        try:
            stats = self.peer_stats()
        except Exception as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the device could not be read: {e}")
        out = []
        for s in stats:
            out.append(
                agent_pb2.Peer(
                    node_name=names.get(s.public_key, ""),
                    public_key=s.public_key,
                    endpoint=str(s.endpoint) if s.endpoint else "",
                    allowed_ips=[str(n) for n in s.allowed_ips],
                    last_handshake=_ts(s.last_handshake),
                    rx_bytes=s.rx_bytes,
                    tx_bytes=s.tx_bytes,
                    persistent_keepalive_interval=getattr(s, "persistent_keepalive_interval", 0),
                )
            )
        return agent_pb2.ListPeersResponse(peers=out)

    def RotateKey(self, request: Any, context: Any) -> agent_pb2.RotateKeyResponse:
        try:
            public_key, wall = self.rotate()
        except Exception as e:
            context.abort(grpc.StatusCode.INTERNAL, f"key rotation failed: {e}")
        return agent_pb2.RotateKeyResponse(public_key=public_key, rotated_at=_ts(wall))

    def WatchEvents(self, request: Any, context: Any) -> Iterator[agent_pb2.Event]:
        q = self.broadcaster.subscribe()
        try:
            while context.is_active():
                try:
                    ev = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield agent_pb2.Event(
                    time=_ts(ev.wall),
                    type=ev.type,
                    reason=ev.reason,
                    message=ev.message,
                    node_name=ev.node,
                )
        finally:
            self.broadcaster.unsubscribe(q)


def serve(servicer: Servicer, socket_path: pathlib.Path) -> grpc.Server:
    """Binds the unix socket (folder 0700, socket 0600) and starts serving."""
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(socket_path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # left by an agent that did not stop cleanly
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    return server
