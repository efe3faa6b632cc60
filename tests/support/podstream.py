"""A ping stream between two pods under a capture of the underlay, for the tests of upgrades.

What a user of the pods notices while something is upgraded: which echo replies never came
(by icmp_seq), the longest run of them as seconds at the stream's rate, and what crossed the
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
from collections.abc import Iterable
from types import TracebackType

from podwire.sandbox import record, topology, verify

MARKER_BYTES = 16  # what `ping -p` repeats through the payload


@dataclasses.dataclass
class Seen:
    sent: int
    received: int
    lost: list[int]  # icmp_seq of every request without a reply
    longest_gap: float  # seconds: the longest run of lost requests, at the stream's interval
    gap_from: int  # the icmp_seq that run starts with (0: none lost)
    summary: str  # ping's own line
    analysis: verify.Analysis

    def describe(self) -> str:
        a = self.analysis
        return (
            f"{self.received}/{self.sent} replies, {len(self.lost)} lost, longest gap "
            f"{self.longest_gap:.2f}s from icmp_seq {self.gap_from}; underlay: {a.transport} WireGuard "
            f"transport messages, {a.clear} frames with a pod address in clear, {a.payload} with "
            "the payload"
        )


def longest_run(lost: Iterable[int]) -> tuple[int, int]:
    """(first, length) of the longest run of consecutive numbers; (0, 0) for none."""
    best, start, length, previous = (0, 0), 0, 0, None
    for n in sorted(lost):
        if previous is not None and n == previous + 1:
            length += 1
        else:
            start, length = n, 1
        if length > best[1]:
            best = (start, length)
        previous = n
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

    def __enter__(self) -> PodStream:
        self.capture.start()
        argv = ["ping", "-n", "-i", str(self.interval), "-c", str(self.count), "-W", "1",
                "-p", self.marker.hex(), self.dst.ip]  # fmt: skip
        self.ping = subprocess.Popen(
            self.src.ns.exec_args(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return self

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
        assert self.ping is not None
        out, _ = self.ping.communicate(timeout=timeout)
        frames = self.capture.stop()
        totals = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert totals, out[-2000:]
        sent, received = int(totals.group(1)), int(totals.group(2))
        replied = {int(m) for m in re.findall(r"bytes from .*icmp_seq=(\d+)", out)}
        lost = sorted(set(range(1, sent + 1)) - replied)
        first, length = longest_run(lost)
        pods = [p.ip for p in self.st.pods()]
        return Seen(
            sent=sent,
            received=received,
            lost=lost,
            longest_gap=length * self.interval,
            gap_from=first,
            summary=next(line for line in out.splitlines() if "packets transmitted" in line),
            analysis=verify.analyze(frames, pods, self.marker, self.wg_port),
        )
