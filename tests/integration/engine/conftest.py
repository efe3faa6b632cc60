"""The engine's test bed: two namespaces joined by a veth, a WireGuard in each, set up by `wg`.

ns a                                        ns b
DEV 10.99.0.1/24 ======= tunnel =======     DEV 10.99.0.2/24
veth 192.0.2.1/24 ------- underlay -------  veth 192.0.2.2/24

Each side is podwire-engine, upstream wireguard-go or Debian's wireguard-go, started in the
foreground inside its namespace and configured exactly as a user would: `wg set`, `ip addr`,
`ip link set up`. The `bed` fixture builds the pair; measured throughput is collected and
printed at the end of the session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from podwire.sandbox import netns as netns_mod
from podwire.sandbox import tools

ENGINE = str(pathlib.Path(sys.executable).parent / "podwire-engine")
SOCKET_DIR = pathlib.Path("/var/run/wireguard")
PORT = 51820
KINDS = ("engine", "wireguard-go", "debian-wireguard-go")
THROUGHPUT: list[tuple[str, float]] = []


@dataclasses.dataclass
class Side:
    """One WireGuard endpoint: its namespace, device, keys and addresses."""

    netns: netns_mod.NetnsFactory
    ns: netns_mod.Netns
    kind: str
    dev: str
    underlay: str
    tunnel: str
    private_key: str
    public_key: str
    keyfile: pathlib.Path
    log: pathlib.Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"[{self.underlay}]:{PORT}" if ":" in self.underlay else f"{self.underlay}:{PORT}"

    @property
    def socket(self) -> pathlib.Path:
        return SOCKET_DIR / f"{self.dev}.sock"

    def command(self) -> list[str]:
        if self.kind == "engine":
            return [ENGINE, "-f", self.dev]
        binary = (
            tools.path("wireguard-go")
            if self.kind == "wireguard-go"
            else tools.debian_wireguard_go()
        )
        return [binary, "-f", self.dev]

    def start(self) -> None:
        env = {
            "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
            "LOG_LEVEL": "debug",
            **self.env,
        }
        self.proc = self.netns.spawn(self.ns, self.command(), log_path=self.log, env=env)
        netns_mod.wait_until(self.is_up, timeout=20, what=f"{self.kind} {self.dev} to serve")

    def is_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.kind} exited with {self.proc.returncode}: {self.tail_log()}"
            )
        return self.ns.link_exists(self.dev) and netns_mod.unix_socket_answers(self.socket)

    def stop(self, *, kill: bool = False) -> None:
        assert self.proc is not None
        if kill:
            self.proc.kill()
            self.proc.wait(10)
            # What a killed engine cannot remove itself: its socket and its features file.
            for leftover in (".sock", ".features"):
                (SOCKET_DIR / f"{self.dev}{leftover}").unlink(missing_ok=True)
        else:
            netns_mod.stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ns.run("wg", *args, check=check)

    def configure(
        self, peer: Side, *, endpoint: str | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.wg(
            "set", self.dev, "private-key", str(self.keyfile), "listen-port", str(PORT),
            "peer", peer.public_key, "endpoint", endpoint or peer.endpoint,
            "allowed-ips", f"{peer.tunnel}/32", *extra,
        )  # fmt: skip
        self.ns.ip("addr", "add", f"{self.tunnel}/24", "dev", self.dev)
        self.ns.ip("link", "set", self.dev, "up")

    def dump(self) -> list[list[str]]:
        """`wg show DEV dump`: the device's line, then one line per peer, split on tabs."""
        return [line.split("\t") for line in self.wg("show", self.dev, "dump").stdout.splitlines()]

    def uapi(self, request: bytes) -> bytes:
        """Sends one raw request on the UAPI socket and returns the whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.socket))
            sock.sendall(request)
            answer = b""
            while not (answer.endswith(b"\n\n") and b"errno=" in answer):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclasses.dataclass
class Wire:
    a: Side
    b: Side
    veth_a: str
    veth_b: str


@dataclasses.dataclass
class Bed:
    """What the engine tests use: bed.wire("engine", "wireguard-go") builds a configured pair;
    bed.iperf and bed.record measure and record throughput."""

    netns: netns_mod.NetnsFactory
    tmp_path: pathlib.Path

    def side(
        self, ns: netns_mod.Netns, kind: str, underlay: str, tunnel: str, env: dict[str, str]
    ) -> Side:
        dev = self.netns.unique("w")
        private, public = tools.wg_keypair()
        keyfile = tools.write_private_key(self.tmp_path / f"{dev}.key", private)
        side = Side(
            self.netns, ns, kind, dev, underlay, tunnel, private, public, keyfile,
            self.tmp_path / f"{dev}-{kind}.log", env,
        )  # fmt: skip
        side.start()
        return side

    def wire(
        self,
        kind_a: str = "engine",
        kind_b: str = "engine",
        *,
        a_env: dict[str, str] | None = None,
        b_env: dict[str, str] | None = None,
        ipv6: bool = False,
    ) -> Wire:
        a, b = self.netns.namespace("a"), self.netns.namespace("b")
        under_a, under_b = ("fd00:2::1", "fd00:2::2") if ipv6 else ("192.0.2.1", "192.0.2.2")
        size = 64 if ipv6 else 24
        veth_a, veth_b = self.netns.veth(
            a, b, a_addr=f"{under_a}/{size}", b_addr=f"{under_b}/{size}"
        )
        sa = self.side(a, kind_a, under_a, "10.99.0.1", a_env or {})
        sb = self.side(b, kind_b, under_b, "10.99.0.2", b_env or {})
        sa.configure(sb)
        sb.configure(sa)
        return Wire(sa, sb, veth_a, veth_b)

    @staticmethod
    def iperf(client: Side, server: Side, *, reverse: bool = False, seconds: int = 10) -> float:
        return iperf(client, server, reverse=reverse, seconds=seconds)

    @staticmethod
    def record(name: str, bits_per_second: float) -> None:
        THROUGHPUT.append((name, bits_per_second))


@pytest.fixture
def bed(netns: netns_mod.NetnsFactory, tmp_path: pathlib.Path) -> Bed:
    """The engine test bed; everything it makes goes with the netns fixture."""
    return Bed(netns, tmp_path)


def iperf(client: Side, server: Side, *, reverse: bool = False, seconds: int = 10) -> float:
    """Bits per second of a TCP iperf3 run from client to server (server to client with -R)."""
    server.netns.spawn(
        server.ns,
        ["iperf3", "-s", "-1", "-B", server.tunnel],
        log_path=server.log.with_suffix(".iperf"),
    )
    netns_mod.wait_until(
        lambda: f"{server.tunnel}:5201" in server.ns.run("ss", "-tln").stdout,
        timeout=10,
        what="iperf3 to listen",
    )
    proc = client.ns.run(
        "iperf3", "-c", server.tunnel, "-t", str(seconds), "-J", *(["-R"] if reverse else []),
        timeout=seconds + 30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"iperf3 failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout)
    received = result.get("end", {}).get("sum_received")
    assert received, f"iperf3 measured nothing: {result.get('error')} {proc.stdout[-3000:]}"
    return float(received["bits_per_second"])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if THROUGHPUT:
        terminalreporter.section("podwire-engine throughput (iperf3 -t 10, TCP)")
        for name, bps in THROUGHPUT:
            terminalreporter.write_line(f"{name:50s} {bps / 1e6:8.1f} Mbit/s")
        path = os.environ.get("PODWIRE_THROUGHPUT_JSON")
        if path:
            pathlib.Path(path).write_text(json.dumps(dict(THROUGHPUT), indent=2))


@pytest.fixture(params=["native", "python"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test's engines on the native fast path and again on the pure-Python one: both
    must interoperate. The engine's fast_path log field names the one in force."""
    monkeypatch.setenv("PODWIRE_ENGINE_NATIVE", "on" if request.param == "native" else "off")
    return f"{request.param}_fastpath"
