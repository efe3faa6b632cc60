"""The sandbox's parsing, without root: the capture's frames (what `verify` judges by), the
record's file (what `down` removes by) and the command line."""

from __future__ import annotations

import ipaddress
import os
import pathlib
import struct

import pytest

from podwire.agent import cli
from podwire.sandbox import record, supervisor, verify

POD_A, POD_B = "10.244.1.10", "10.244.2.11"
NODE_A, NODE_B = "192.0.2.11", "192.0.2.12"
WG_PORT = 51871


def _ipv4(proto: int, src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    )  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + header + payload


def _udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return _ipv4(17, src, dst, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def _wireguard(kind: int, body: bytes = b"\x5a" * 48) -> bytes:
    return _udp(NODE_A, NODE_B, WG_PORT, WG_PORT, bytes([kind, 0, 0, 0]) + body)


def _pcap(frames: list[bytes], *, nanoseconds: bool = False, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    out = struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 262144, 1)
    for i, f in enumerate(frames):
        out += struct.pack(e + "IIII", 1700000000 + i, 0, len(f), len(f)) + f
    return out


def test_encrypted_frames_are_counted_by_wireguard_message_type() -> None:
    frames = [_wireguard(1), _wireguard(2), *(_wireguard(4) for _ in range(5))]
    a = verify.analyze(frames, [POD_A, POD_B], b"marker", WG_PORT)
    assert a.wireguard == {"initiation": 1, "response": 1, "transport": 5}
    assert a.transport == 5 and a.clear == 0 and a.payload == 0


@pytest.mark.parametrize(
    "frame",
    [
        _ipv4(1, POD_A, POD_B, b"\x08\x00" + b"\0" * 30),  # ICMP between pods
        _udp(NODE_A, NODE_B, 4789, 4789, b"\0" * 8 + _ipv4(6, POD_B, POD_A, b"\0" * 20)),  # inside
    ],
    ids=["in the IP header", "inside an encapsulation"],
)
def test_a_pod_address_anywhere_in_a_frame_is_plaintext(frame: bytes) -> None:
    a = verify.analyze([_wireguard(4), frame], [POD_A, POD_B], b"marker", WG_PORT)
    assert a.clear == 1 and a.transport == 1
    assert a.examples and ("10.244." in a.examples[0])


def test_the_payload_is_found_even_between_other_addresses() -> None:
    frame = _udp(NODE_A, NODE_B, 40000, 7777, b"xx podwire-probe-abc xx")
    a = verify.analyze([frame], [POD_A], b"podwire-probe-abc", WG_PORT)
    assert a.payload == 1 and a.clear == 0 and a.transport == 0


def test_udp_on_another_port_is_not_taken_for_wireguard() -> None:
    a = verify.analyze(
        [_udp(NODE_A, NODE_B, 53, 53, b"\x04\0\0\0" + b"\0" * 20)], [], b"m", WG_PORT
    )
    assert a.wireguard == {}


@pytest.mark.parametrize("nanoseconds", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
def test_pcap_files_are_read_frame_by_frame(
    tmp_path: pathlib.Path, nanoseconds: bool, big_endian: bool
) -> None:
    frames = [_wireguard(4), _ipv4(1, POD_A, POD_B, b"\0" * 10), b"\xff" * 60]
    path = tmp_path / "c.pcap"
    path.write_bytes(_pcap(frames, nanoseconds=nanoseconds, big_endian=big_endian))
    assert verify.read_pcap(path) == frames


def test_an_empty_capture_has_no_frames(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.pcap"
    path.write_bytes(_pcap([]))
    assert verify.read_pcap(path) == []
    path.write_bytes(b"")
    assert verify.read_pcap(path) == []


def _record(tmp_path: pathlib.Path) -> record.Record:
    st = record.Record(
        directory=str(tmp_path), datapath="userspace", kubeconfig="k", apiserver_url="u",
        apiserver_port=1, prefix="pws", tag="abc123", counter=7, underlay_netns="pwsulabc1231",
        bridge="br0", namespaces=["pwsulabc1231", "pwsnabc1232"],
    )  # fmt: skip
    st.nodes.append(
        record.Node(
            "node1", 1, "pwsnabc1232", NODE_A, "10.244.1.0/24", "pwswabc1233", tmp_path / "node1",
            [record.Pod("node1-pod0", "pwspabc1234", POD_A, "node1")],
        )
    )  # fmt: skip
    me = os.getpid()
    started = supervisor.start_time(me)
    assert started is not None
    st.processes.append(record.Process("agent", me, started, ["a"], "log", node="node1"))
    st.processes.append(record.Process("etcd", me, started + 1, ["e"], "log"))  # a reused PID
    return st


def test_the_record_round_trips_through_its_file(tmp_path: pathlib.Path) -> None:
    st = _record(tmp_path)
    st.save()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = record.Record.load(tmp_path)
    assert loaded == st
    assert loaded.node("node1").pods[0].ip == POD_A
    assert loaded.node("node1").api_socket == tmp_path / "node1" / "agent.sock"
    assert loaded.node("node1").ns.name == "pwsnabc1232"
    assert [p.ip for p in loaded.pods()] == [POD_A]
    assert [p.role for p in loaded.find("agent", "node1")] == ["agent"]
    with pytest.raises(KeyError):
        loaded.node("node9")
    assert record.Record.load(tmp_path / "nowhere") is None


def test_a_tests_record_is_never_written(tmp_path: pathlib.Path) -> None:
    st = record.Record()  # no directory: a test's cluster, in memory
    st.checkpoint()
    assert not list(tmp_path.iterdir()) and not pathlib.Path(record.STATE_FILE).exists()


def test_a_pid_is_ours_only_with_the_start_time_we_recorded(tmp_path: pathlib.Path) -> None:
    agent, etcd = _record(tmp_path).processes
    assert agent.alive()
    assert not etcd.alive()  # same PID, another start time: not the process we started


def test_a_pid_that_is_no_longer_ours_is_never_signalled(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, reused = _record(tmp_path).processes
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    supervisor.stop(reused, grace=0.1)
    supervisor.kill(2**22 + 12345)
    assert sent == []


def test_stop_ends_a_child_with_sigterm_and_reaps_it() -> None:
    proc = supervisor.start(["sleep", "30"])
    started = supervisor.identify(proc.pid)
    assert started is not None and supervisor.alive(started)
    supervisor.stop(started, grace=5)
    assert not supervisor.alive(started)
    assert proc.poll() == -15  # SIGTERM, reaped through its Popen


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace() -> None:
    proc = supervisor.start(["sh", "-c", "trap '' TERM; echo ready; sleep 30"], stdout_pipe=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    supervisor.stop(proc, grace=0.3)
    assert proc.returncode == -9


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match="the moon"):
        supervisor.wait_until(lambda: False, timeout=0.1, interval=0.01, what="the moon")
    calls = iter([False, False, True])
    supervisor.wait_until(lambda: next(calls), timeout=5, interval=0.01)


def test_start_time_is_stable_for_a_process_and_none_without_one() -> None:
    assert supervisor.start_time(os.getpid()) == supervisor.start_time(os.getpid()) is not None
    assert supervisor.start_time(2**22 + 12345) is None  # above pid_max: no such process


@pytest.mark.parametrize(
    "argv",
    [
        ["sandbox", "up", "--nodes", "many"],
        ["sandbox", "up", "--datapath", "ebpf"],
        ["sandbox", "status", "-o", "yaml"],
        ["sandbox", "teleport"],
    ],
)
def test_the_command_line_refuses_what_it_cannot_do(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err or "invalid int" in err


def test_up_refuses_a_node_count_it_cannot_address(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PODWIRE_SANDBOX_DIR", str(tmp_path / "sb"))
    assert cli.main(["sandbox", "up", "--nodes", "0"]) == 1
    assert "--nodes must be between 1 and 200" in capsys.readouterr().err
    assert not (tmp_path / "sb").exists()


def test_a_udp_gso_batch_seen_before_segmentation_counts_each_transport_message() -> None:
    # The engine's UDP GSO: three transport messages to one receiver, consecutive counters,
    # in one captured frame (the last one shorter); a lone message counts once.
    def transport(counter: int, ciphertext: int) -> bytes:
        return (
            b"\x04\0\0\0"
            + b"\x11\x22\x33\x44"
            + counter.to_bytes(8, "little")
            + b"\x5a" * ciphertext
        )

    batch = transport(7, 96) + transport(8, 96) + transport(9, 48)
    frame = _udp(NODE_A, NODE_B, WG_PORT, WG_PORT, batch)
    a = verify.analyze([frame], [POD_A, POD_B], b"marker", WG_PORT)
    assert a.wireguard == {"transport": 3} and a.frames == 1
    lone = _udp(NODE_A, NODE_B, WG_PORT, WG_PORT, transport(7, 96) + b"\x5a" * 112)
    assert verify.analyze([lone], [POD_A, POD_B], b"marker", WG_PORT).transport == 1
