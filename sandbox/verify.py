"""`podwire sandbox verify`: the proof, from a real capture, that pod traffic crosses encrypted.

Between pods on different nodes it sends ICMP, TCP and UDP (with a payload it can recognise)
while tcpdump captures on the underlay bridge, which every frame between nodes crosses. Then
it reads the capture: no frame may carry a pod address or the payload in clear, and WireGuard
transport messages (type 4) must have carried the traffic.

A check that never fails proves nothing, so it runs a control: for one pair of pods it takes
encryption away (host routes for the two pod addresses via the other node's underlay address,
on both nodes: more specific than the agent's routes, and not tagged with its protocol, so the
agent leaves them alone), sends the same traffic, and asserts that the capture now does see
the pod addresses and the payload. The routes are removed after, whatever happens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import pathlib
import re
import secrets
import struct
import subprocess
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from podwire.sandbox import netns, record, supervisor, tools, topology

PROBE_PORT = 7777
CONTROL_PROTO = "static"  # not the agent's 251: its reconcile must not touch these routes
WG_TRANSPORT = 4
WG_TYPES = {1: "initiation", 2: "response", 3: "cookie", 4: "transport"}


class VerifyError(RuntimeError):
    """The proof could not run (not: the proof failed, which the report says)."""


# -- the capture -------------------------------------------------------------------------------


class Capture:
    """tcpdump on the underlay bridge, writing every frame to a pcap file until stop()."""

    def __init__(self, st: record.Record, path: pathlib.Path) -> None:
        self.st = st
        self.path = path
        self.log = path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        args = [tools.path("tcpdump"), "-i", self.st.bridge, "-n", "-U", "--immediate-mode", "-s", "0", "-w", str(self.path)]  # fmt: skip
        self.log.write_text("")
        proc = supervisor.start(args, log=self.log, netns=self.st.underlay_netns, session=False)
        self.proc = proc
        supervisor.wait_until(
            lambda: "listening on" in self.log.read_text() or proc.poll() is not None,
            timeout=15,
            what="tcpdump to listen",
        )
        if proc.poll() is not None:
            raise VerifyError(f"tcpdump did not start: {self.log.read_text().strip()}")
        return self

    def stop(self) -> list[bytes]:
        """Ends tcpdump once the file stops growing; returns the frames it wrote."""
        assert self.proc is not None
        sizes: list[int] = []

        def settled() -> bool:
            sizes.append(self.path.stat().st_size if self.path.exists() else 0)
            return len(sizes) > 3 and sizes[-1] == sizes[-4]

        supervisor.wait_until(settled, timeout=10, interval=0.1, what="the capture to settle")
        supervisor.stop(self.proc)
        summary = self.log.read_text()
        dropped = re.search(r"(\d+) packets? dropped by kernel", summary)
        if dropped is None or int(dropped.group(1)):
            raise VerifyError(f"the capture is incomplete, so it proves nothing: {summary.strip()}")
        return read_pcap(self.path)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            supervisor.stop(self.proc)


def read_pcap(path: pathlib.Path) -> list[bytes]:
    """The frames of a classic pcap file (what `tcpdump -w` writes), link type Ethernet."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<"}.get(magic, ">")
    frames, off = [], 24
    while off + 16 <= len(data):
        _sec, _frac, incl, _orig = struct.unpack(endian + "IIII", data[off : off + 16])
        frames.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    return frames


# -- reading the frames ------------------------------------------------------------------------


@dataclasses.dataclass
class Analysis:
    frames: int = 0
    wireguard: dict[str, int] = dataclasses.field(default_factory=dict)  # by message type
    clear: int = 0  # frames with a pod address in them
    payload: int = 0  # frames with the probe's payload in them
    examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def transport(self) -> int:
        return self.wireguard.get("transport", 0)


def analyze(
    frames: Iterable[bytes], pod_ips: Iterable[str], marker: bytes, wg_port: int
) -> Analysis:
    """Counts WireGuard messages by type, and frames carrying a pod address or the marker
    anywhere (in an IP header, or inside whatever the frame carries)."""
    addrs = {ipaddress.ip_address(ip).packed: ip for ip in pod_ips}
    a = Analysis()
    for f in frames:
        a.frames += 1
        wg = _wireguard_type(f, wg_port)
        if wg is not None:
            count = _transport_messages(f) if wg == "transport" else 1
            a.wireguard[wg] = a.wireguard.get(wg, 0) + count
        found = [ip for raw, ip in addrs.items() if raw in f]
        if found:
            a.clear += 1
            if len(a.examples) < 5:
                a.examples.append(f"{_describe(f)} carries {', '.join(found)}")
        if marker in f:
            a.payload += 1
    return a


def _ipv4(frame: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """(protocol, source, destination, payload) of an IPv4 frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    return ip[9], ip[12:16], ip[16:20], ip[ihl:]


def _wireguard_type(frame: bytes, port: int) -> str | None:
    v4 = _ipv4(frame)
    if v4 is None or v4[0] != 17 or len(v4[3]) < 12:
        return None
    udp = v4[3]
    sport, dport = struct.unpack("!HH", udp[:4])
    msg = udp[8:]
    if port not in (sport, dport) or msg[1:4] != b"\0\0\0":
        return None
    return WG_TYPES.get(msg[0], f"unknown {msg[0]}")


def _transport_messages(frame: bytes) -> int:
    """How many WireGuard transport messages a frame carries: one, or several when the engine
    sent them with UDP GSO and the capture saw the batch before the kernel cut it (every
    segment but the last as long as the first, each a transport message to the same receiver
    with the next counter, at a multiple of 16 bytes)."""
    v4 = _ipv4(frame)
    if v4 is None:
        return 1
    msg = v4[3][8:]
    if len(msg) < 64:
        return 1
    head, receiver = msg[:4], msg[4:8]
    counter = int.from_bytes(msg[8:16], "little")
    for size in range(32, len(msg) - 31, 16):
        following = int.from_bytes(msg[size + 8 : size + 16], "little")
        if msg[size : size + 8] == head + receiver and following == counter + 1:
            return -(-len(msg) // size)
    return 1


def _describe(frame: bytes) -> str:
    v4 = _ipv4(frame)
    if v4 is None:
        return f"a frame of ethertype {frame[12:14].hex()}"
    proto = {1: "ICMP", 6: "TCP", 17: "UDP"}.get(v4[0], f"proto {v4[0]}")
    return f"{proto} {ipaddress.ip_address(v4[1])} -> {ipaddress.ip_address(v4[2])}"


# -- the traffic -------------------------------------------------------------------------------


def _probe(*args: str) -> list[str]:
    return [sys.executable, "-m", "podwire.sandbox.probe", *args]


@dataclasses.dataclass
class Traffic:
    """ICMP between every pair of pods on different nodes, TCP and UDP for each pair of nodes."""

    st: record.Record
    marker: bytes
    pairs: list[tuple[record.Pod, record.Pod]]  # ICMP both ways
    flows: list[tuple[record.Pod, record.Pod]]  # TCP and UDP from the first to the second

    def send(self) -> tuple[int, list[str]]:
        """Sends it all; returns the packets sent (at least) and what did not come back."""
        failures: list[str] = []
        servers = self._servers()
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                pings = list(pool.map(lambda p: (p, _ping(*p)), self.pairs))
                flows = list(pool.map(self._flow, self.flows))
        finally:
            for s in servers:
                supervisor.stop(s)
        failures += [f"ICMP {a.name} -> {b.name}" for (a, b), ok in pings if not ok]
        for fails in flows:
            failures += fails
        return 4 * len(self.pairs) + 4 * len(self.flows), failures

    def _servers(self) -> list[subprocess.Popen[bytes]]:
        procs = []
        for pod in {b.name: b for _, b in self.flows}.values():
            proc = supervisor.start(
                _probe("serve", str(PROBE_PORT)), netns=pod.netns, session=False, stdout_pipe=True
            )
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise VerifyError(f"the probe server in {pod.name} did not start")
        return procs

    def _flow(self, pair: tuple[record.Pod, record.Pod]) -> list[str]:
        a, b = pair
        payload = (self.marker + b" ") * 20
        fails = []
        for proto in ("tcp", "udp"):
            args = _probe("send", proto, b.ip, str(PROBE_PORT), payload.decode())
            done = subprocess.run(
                netns.Netns(a.netns).exec_args(args), capture_output=True, text=True, timeout=30
            )
            if done.returncode != 0:
                fails.append(f"{proto.upper()} {a.name} -> {b.name} {done.stderr.strip()}")
        return fails


def _ping(a: record.Pod, b: record.Pod) -> bool:
    return netns.Netns(a.netns).ping(b.ip, count=2, timeout=5, interval=0.2)


def cross_node_pairs(st: record.Record) -> list[tuple[record.Pod, record.Pod]]:
    pods = st.pods()
    return [(a, b) for a in pods for b in pods if a.node != b.node]


def node_pair_flows(st: record.Record) -> list[tuple[record.Pod, record.Pod]]:
    flows = []
    for i, x in enumerate(st.nodes):
        for y in st.nodes[i + 1 :]:
            if x.pods and y.pods:
                flows.append((x.pods[0], y.pods[-1]))
    return flows


# -- the control: one pair in clear --------------------------------------------------------------


# Ahead of the agent's strictMode rules (5200, 5210), so that the control's routes in the main
# table win over podwire's table and its inbound blackhole: a misconfiguration on purpose.
CONTROL_RULE_PRIORITY = "5100"


def _control_routes(st: record.Record, a: record.Pod, b: record.Pod) -> list[tuple[str, list[str]]]:
    na, nb = st.node(a.node), st.node(b.node)
    return [
        (na.netns, [f"{b.ip}/32", "via", nb.underlay_ip, "proto", CONTROL_PROTO]),
        (nb.netns, [f"{a.ip}/32", "via", na.underlay_ip, "proto", CONTROL_PROTO]),
    ]


def _control_rules(st: record.Record, a: record.Pod, b: record.Pod) -> list[tuple[str, list[str]]]:
    """Each node looks the other pod up in the main table, both ways, before podwire does."""
    na, nb = st.node(a.node), st.node(b.node)
    out = []
    for ns, other in ((na.netns, b.ip), (nb.netns, a.ip)):
        for direction in ("to", "from"):
            out.append(
                (
                    ns,
                    [direction, f"{other}/32", "lookup", "main", "priority", CONTROL_RULE_PRIORITY],
                )
            )
    return out


class Unencrypted:
    """Takes encryption away for one pair of pods, and gives it back on exit."""

    def __init__(self, st: record.Record, a: record.Pod, b: record.Pod) -> None:
        self.changes = [("rule", r) for r in _control_rules(st, a, b)]
        self.changes += [("route", r) for r in _control_routes(st, a, b)]
        self.added: list[tuple[str, tuple[str, list[str]]]] = []

    def __enter__(self) -> Unencrypted:
        try:
            for kind, (ns, spec) in self.changes:
                netns.Netns(ns).ip(kind, "add", *spec)
                self.added.append((kind, (ns, spec)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for kind, (ns, spec) in reversed(self.added):
            netns.Netns(ns).ip(kind, "del", *spec, check=False)
        self.added.clear()


# -- the whole proof ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    name: str
    sent: int
    failures: list[str]
    analysis: Analysis
    passed: bool
    verdict: str


@dataclasses.dataclass
class Report:
    encrypted: Run
    control: Run | None

    @property
    def passed(self) -> bool:
        return self.encrypted.passed and (self.control is None or self.control.passed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"passed": self.passed}


def encrypted_run(st: record.Record, workdir: pathlib.Path) -> Run:
    marker = b"podwire-probe-" + secrets.token_hex(6).encode()
    traffic = Traffic(st, marker, cross_node_pairs(st), node_pair_flows(st))
    with Capture(st, workdir / "encrypted.pcap") as cap:
        sent, failures = traffic.send()
        frames = cap.stop()
    a = analyze(frames, [p.ip for p in st.pods()], marker, topology.LISTEN_PORT)
    problems = list(failures)
    if a.clear:
        problems.append(f"{a.clear} frames carry a pod address in clear: {'; '.join(a.examples)}")
    if a.payload:
        problems.append(f"{a.payload} frames carry the probe payload in clear")
    if a.transport < sent:
        problems.append(f"only {a.transport} WireGuard transport messages for {sent} packets")
    verdict = "; ".join(problems) or (
        f"{a.transport} WireGuard transport messages carried {sent}+ packets; "
        "no pod address and no payload in clear"
    )
    return Run("encrypted", sent, failures, a, not problems, verdict)


def control_run(st: record.Record, workdir: pathlib.Path) -> Run | None:
    """One pair of pods routed around the tunnel: the capture must see them in clear."""
    pairs = [(x.pods[0], y.pods[0]) for x in st.nodes for y in st.nodes if x is not y]
    if not pairs or not pairs[0][0] or not pairs[0][1]:
        return None
    a, b = pairs[0]
    marker = b"podwire-probe-" + secrets.token_hex(6).encode()
    traffic = Traffic(st, marker, [(a, b)], [(a, b)])
    with Unencrypted(st, a, b), Capture(st, workdir / "control.pcap") as cap:
        sent, failures = traffic.send()
        frames = cap.stop()
    a_ = analyze(frames, [a.ip, b.ip], marker, topology.LISTEN_PORT)
    problems = list(failures)
    if not a_.clear:
        problems.append("the capture saw no pod address although the pair was routed in clear")
    if not a_.payload:
        problems.append("the capture saw no payload although the pair was routed in clear")
    name = f"control ({a.name} <-> {b.name} in clear)"
    verdict = "; ".join(problems) or (
        f"the capture caught {a_.clear} frames with the pods' addresses and {a_.payload} "
        "with the payload: it does see plaintext"
    )
    # Back to the tunnel: the pair reaches itself encrypted again.
    if not netns.Netns(a.netns).ping(b.ip, count=1, timeout=5):
        problems.append(f"{a.name} cannot reach {b.name} after the control routes are removed")
        verdict = "; ".join(problems)
    return Run(name, sent, failures, a_, not problems, verdict)


def verify(st: record.Record, *, out: TextIO = sys.stdout) -> Report:
    if len(st.nodes) < 2:
        raise VerifyError("the proof needs pods on two nodes at least")
    workdir = pathlib.Path(st.directory) / "verify"
    workdir.mkdir(exist_ok=True, mode=0o700)
    pairs = len(cross_node_pairs(st))
    print(
        f"encrypted run: ICMP between {pairs} pod pairs on different nodes, TCP and UDP between "
        f"{len(node_pair_flows(st))}, captured on the underlay bridge ...",
        file=out, flush=True,
    )  # fmt: skip
    enc = encrypted_run(st, workdir)
    _print_run(enc, out)
    print("control run: one pair routed around the tunnel, same capture ...", file=out, flush=True)
    ctl = control_run(st, workdir)
    if ctl is not None:
        _print_run(ctl, out)
    report = Report(enc, ctl)
    print(
        "PASS: pod traffic crosses the underlay only encrypted" if report.passed else "FAIL",
        file=out,
    )
    return report


def _print_run(run: Run, out: TextIO) -> None:
    a = run.analysis
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(a.wireguard.items())) or "none"
    print(f"  {a.frames} frames captured; WireGuard messages: {kinds}", file=out)
    print(f"  {'ok' if run.passed else 'FAILED'}: {run.verdict}", file=out, flush=True)
