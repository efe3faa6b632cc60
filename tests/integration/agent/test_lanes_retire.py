"""select.retire_lane on real links in a throwaway namespace: a link a lane above the
configured ones left (a kernel device, or an engine's TUN whose engine already died) is
deleted and said so; a socket (and the features file beside it) an engine ended by SIGKILL
left is removed; a lane with nothing left is nothing done, and a lane whose name cannot fit a
link is not looked for."""

from __future__ import annotations

import pathlib
import socket

from podwire.agent import config
from podwire.agent.datapath import select
from podwire.sandbox import netns as netns_mod


def _cfg(device: str, lanes: int = 1) -> config.Config:
    return config.Config(node_name="n1", device=device, fail_closed=False, lanes=lanes)


def test_a_left_link_and_a_dead_socket_go_and_lanes_in_use_are_not_asked(
    netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path
) -> None:
    ns = netns.namespace()
    device = netns.unique("w")
    ns.ip("tuntap", "add", f"{device}_2", "mode", "tun")  # a TUN link with no engine behind it
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # bound, never listening: dead
    dead.bind(str(tmp_path / f"{device}_3.sock"))
    dead.close()
    # What the killed engine published beside its socket (ipc.write_features) goes with it.
    (tmp_path / f"{device}_3.features").write_text('{"fast_path": "native_fastpath"}\n')
    cfg = _cfg(device, lanes=2)
    assert list(select.retired_lanes(cfg)) == list(range(2, config.MAX_LANES))
    done = {
        lane: select.retire_lane(cfg, lane, netns=ns.name, socket_dir=tmp_path)
        for lane in select.retired_lanes(cfg)
    }
    assert done == {2: f"lane 2's device {device}_2", **{i: None for i in range(3, 8)}}
    assert not ns.link_exists(f"{device}_2")
    assert not (tmp_path / f"{device}_3.sock").exists()
    assert not (tmp_path / f"{device}_3.features").exists()


def test_a_lane_whose_name_cannot_be_a_link_is_not_looked_for(tmp_path: pathlib.Path) -> None:
    cfg = _cfg("fourteen_chars", lanes=1)  # 14 + "_1": 16 characters, no link has that name
    assert select.retire_lane(cfg, 1, socket_dir=tmp_path) is None
