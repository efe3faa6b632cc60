"""A ping stream between two pods under a capture of the underlay, for the tests of upgrades.

What a user of the pods notices while something is upgraded: which echo replies never came
(by icmp_seq), the longest time without a reply (by ping's own timestamps: under load ping
sends fewer than its rate, so lost requests times the interval would understate it; from the
stream's first reply to its last), and what crossed the
underlay: WireGuard's messages, and any frame with a pod address or the stream's payload in
clear. The payload carries a random marker (`ping -p`), so that it is found in any frame.

    with podstream.PodStream(st, src, dst, tmp_path / "x.pcap", count=1000) as stream:
        ...  # the upgrade
        seen = stream.result()
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import secrets
import subprocess
import threading
from collections.abc import Iterable
from types import TracebackType

from podwire.sandbox import record, topology, verify

MARKER_BYTES = 16  # what `ping -p` repeats through the payload


@dataclasses.dataclass
class Seen:
    sent: int
    received: int
    lost: list[int]  # icmp_seq of every request without a reply
    longest_gap: float  # seconds between two consecutive replies, at most
    gap_from: int  # the icmp_seq of the reply that gap ends with
    max_rtt: float  # seconds: the slowest reply (a reply held up, not lost, shows here)
    summary: str  # ping's own line
    analysis: verify.Analysis

    def describe(self) -> str:
        a = self.analysis
        return (
            f"{self.received}/{self.sent} replies, {len(self.lost)} lost, longest gap "
            f"{self.longest_gap:.2f}s without a reply (until icmp_seq {self.gap_from}), slowest "
            f"reply {self.max_rtt:.3f}s; "
            f"underlay: {a.transport} WireGuard "
            f"transport messages, {a.clear} frames with a pod address in clear, {a.payload} with "
            "the payload"
        )


def longest_silence(replies: Iterable[tuple[int, float]]) -> tuple[float, int]:
    """(seconds, icmp_seq) of the longest time between consecutive (icmp_seq, time) replies,
    and the reply that ended it; (0.0, 0) for fewer than two."""
    best, previous = (0.0, 0), None
    for seq, at in sorted(replies, key=lambda r: r[1]):
        if previous is not None and at - previous > best[0]:
            best = (at - previous, seq)
        previous = at
    return best


class PodStream:
    """`ping` from src to dst at 1/interval a second, count requests, while tcpdump captures
    the underlay; ended (ping killed, tcpdump stopped) on leaving the block, whatever happened."""

    def __init__(
        self,
        st: record.Record,
        src: record.Pod,
        dst: record.Pod,
        pcap: pathlib.Path,
        *,
        count: int,
        interval: float = 0.01,
        wg_port: int = topology.LISTEN_PORT,
    ) -> None:
        self.st, self.src, self.dst, self.count, self.interval = st, src, dst, count, interval
        self.wg_port = wg_port
        self.marker = secrets.token_bytes(MARKER_BYTES)
        self.capture = verify.Capture(st, pcap)
        self.ping: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None
        self.lines: list[str] = []

    def __enter__(self) -> PodStream:
        self.capture.start()
        argv = ["ping", "-n", "-D", "-i", str(self.interval), "-c", str(self.count), "-W", "1",
                "-p", self.marker.hex(), self.dst.ip]  # fmt: skip
        self.ping = subprocess.Popen(
            self.src.ns.exec_args(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # Read as it comes: a pipe left full (64 KiB, some 800 replies) would stop ping itself,
        # which would read as a gap in the traffic.
        self.reader = threading.Thread(target=self._read, args=(self.ping,), daemon=True)
        self.reader.start()
        return self

    def _read(self, ping: subprocess.Popen[str]) -> None:
        assert ping.stdout is not None
        for line in ping.stdout:
            self.lines.append(line)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ping is not None and self.ping.poll() is None:
            self.ping.kill()
            self.ping.wait()
        self.capture.__exit__(kind, exc, tb)

    def done(self) -> bool:
        return self.ping is not None and self.ping.poll() is not None

    def result(self, timeout: float = 180) -> Seen:
        """Waits for the stream's end; what came back and what the capture saw."""
        assert self.ping is not None and self.reader is not None
        self.ping.wait(timeout=timeout)
        self.reader.join(timeout=30)
        out = "".join(self.lines)
        frames = self.capture.stop()
        totals = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert totals, out[-2000:]
        sent, received = int(totals.group(1)), int(totals.group(2))
        replies = [
            (int(seq), float(at))
            for at, seq in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", out, re.M)
        ]
        lost = sorted(set(range(1, sent + 1)) - {seq for seq, _ in replies})
        silence, until = longest_silence(replies)
        pods = [p.ip for p in self.st.pods()]
        return Seen(
            sent=sent,
            received=received,
            lost=lost,
            longest_gap=silence,
            max_rtt=max((float(t) for t in re.findall(r"time=([\d.]+) ms", out)), default=0.0)
            / 1000,
            gap_from=until,
            summary=next(line for line in out.splitlines() if "packets transmitted" in line),
            analysis=verify.analyze(frames, pods, self.marker, self.wg_port),
        )
