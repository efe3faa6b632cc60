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
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from podwire.agent import app, component
from podwire.api import wgnode
from podwire.api.podwire.v1 import agent_pb2, agent_pb2_grpc

DATAPATHS = {"kernel": agent_pb2.DATAPATH_KERNEL, "userspace": agent_pb2.DATAPATH_USERSPACE}


def _ts(wall: float | None) -> timestamp_pb2.Timestamp | None:
    if not wall:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(wall * 1e9))
    return t


def _condition(c: wgnode.Condition) -> agent_pb2.Condition:
    when = timestamp_pb2.Timestamp()
    if c.last_transition_time:
        when.FromJsonString(c.last_transition_time)
    return agent_pb2.Condition(
        type=c.type,
        status=c.status == "True",
        reason=c.reason,
        message=c.message,
        last_transition_time=when,
    )


def _lanes(a: app.Agent) -> list[agent_pb2.Lane]:
    """Every lane's device, key and port; none with one lane (the status's device says it)."""
    if a.cfg.lanes == 1 or not a.keys.public_key:
        return []
    return [
        agent_pb2.Lane(
            index=i,
            device=a.cfg.lane_device(i),
            public_key=a.keys.lane_key(i).public_key_b64(),
            listen_port=a.cfg.lane_port(i),
        )
        for i in range(a.cfg.lanes)
    ]


class Servicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent: app.Agent) -> None:
        self.agent = agent

    def GetStatus(self, request: Any, context: Any) -> agent_pb2.Status:
        a = self.agent
        out = a.reconciler.outcome
        return agent_pb2.Status(
            node_name=a.cfg.node_name,
            public_key=a.keys.public_key,
            listen_port=a.cfg.listen_port,
            datapath=DATAPATHS.get(a.datapath.kind, agent_pb2.DATAPATH_UNSPECIFIED),
            device=a.cfg.device,
            features=list(a.datapath.features),
            nodes_synced=a.watches.nodes.synced,
            wgnodes_synced=a.watches.wgnodes.synced,
            last_reconcile=_ts(out.last_wall),
            last_reconcile_error=out.last_error,
            peer_count=len(out.peers),
            mtu=a.datapath.mtu,
            key_rotated_at=_ts(a.keys.made_wall),
            conditions=[_condition(c) for c in a.publisher.current_conditions()],
            components=[
                agent_pb2.ComponentHealth(name=name, ok=h.ok, message=h.message)
                for name, h in a.health()
            ],
            advisories=[
                agent_pb2.Advisory(name=adv.name, message=adv.message)
                for adv in a.datapath.advisories
            ],
            lanes=_lanes(a),
        )

    def ListPeers(self, request: Any, context: Any) -> agent_pb2.ListPeersResponse:
        names = {}
        for desired in self.agent.reconciler.outcome.peers:
            names[desired.public_key] = desired.node
            names.update((lane.public_key, desired.node) for lane in desired.lanes)
        try:
            peers = [
                (lane, p)
                for lane, backend in self.agent.datapath.backends()
                for p in backend.read().peers
            ]
        except Exception as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the device could not be read: {e}")
        out = [
            agent_pb2.Peer(
                node_name=names.get(p.public_key, ""),
                public_key=p.public_key,
                endpoint=str(p.endpoint) if p.endpoint else "",
                allowed_ips=[str(n) for n in p.allowed_ips],
                last_handshake=_ts(p.last_handshake),
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                persistent_keepalive_interval=p.persistent_keepalive,
                lane=lane,
            )
            for lane, p in peers
        ]
        return agent_pb2.ListPeersResponse(peers=out)

    def RotateKey(self, request: Any, context: Any) -> agent_pb2.RotateKeyResponse:
        try:
            public_key, wall = self.agent.controller.rotate_key()
        except Exception as e:
            context.abort(grpc.StatusCode.INTERNAL, f"key rotation failed: {e}")
        return agent_pb2.RotateKeyResponse(public_key=public_key, rotated_at=_ts(wall))

    def WatchEvents(self, request: Any, context: Any) -> Iterator[agent_pb2.Event]:
        q = self.agent.broadcaster.subscribe()
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
            self.agent.broadcaster.unsubscribe(q)


class ApiServer:
    """The local gRPC API on its unix socket (folder 0700, socket 0600), as a component."""

    name = "api"

    def __init__(self, agent: app.Agent, socket_path: pathlib.Path) -> None:
        self.agent = agent
        self.socket_path = socket_path
        self._server: grpc.Server | None = None

    def start(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an agent that did not stop cleanly
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        agent_pb2_grpc.add_AgentServicer_to_server(Servicer(self.agent), server)
        old = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{path}")
            server.start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(1)
        self.socket_path.unlink(missing_ok=True)

    def health(self) -> component.Health:
        if self._server is None:
            return component.degraded("not serving")
        return component.ok(f"serving on {self.socket_path}")
