"""`podwire-engine`: podwire's userspace WireGuard, started the way wireguard-go is started.

    podwire-engine [-f|--foreground] DEVICE

creates the TUN device DEVICE and its UAPI socket /var/run/wireguard/DEVICE.sock, then detaches
into the background; the command returns 0 only once the engine in the background is serving,
and 1 with the reason if it could not start. So it can stand wherever wireguard-go stands, for
example as wg-quick's WG_QUICK_USERSPACE_IMPLEMENTATION. `wg` configures it. SIGTERM or SIGINT
end it cleanly, removing the device and the socket; so does deleting the device
(`ip link del DEVICE`, as `wg-quick down` does). Beside the socket, DEVICE.features (JSON, 0644,
no secrets) says what is in force: {"fast_path": ..., "offloads": [...]}; it is rewritten when
that changes (GSO refused at run time) and removed with the socket.

Environment:
  WG_PROCESS_FOREGROUND=1   stay in the foreground, as -f does (the agent and the tests do).
  LOG_LEVEL                 debug (or verbose), info (default), error, or silent. In the
                            background the logs go to /dev/null unless LOG_LEVEL is set, as
                            with wireguard-go. Logs are JSON unless stdout is a terminal.
  PODWIRE_ENGINE_TIMERS     a test knob, never for production: shortens the protocol's timers,
                            e.g. "rekey_after_time=6,reject_after_time=10,rekey_attempt_time=9"
                            or "previous_key_grace=5" (names are the fields of
                            timers.ProtocolTimers, values in seconds or messages).
  PODWIRE_ENGINE_OFFLOADS   "off": no TUN offloads (IFF_VNET_HDR) nor UDP GSO/GRO, one
                            packet per system call as before them; otherwise each is used
                            where the kernel has it (the engine_started line lists them).
  PODWIRE_ENGINE_STEERING   "off": one UDP socket, no steering program (see steer); the
                            benchmark's baseline. Otherwise the kernel steers handshakes apart
                            from data where it takes the program ("udp_steering" is listed
                            with the offloads), one socket as before where it does not.
  PODWIRE_ENGINE_NATIVE     "off": the pure-Python fast path (fastpath.py) even where the C
                            extension is built; otherwise the native one where it is built
                            (engine_started says which: fast_path).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from podwire.agent import log as log_mod
from podwire.agent.engine import (
    device as device_mod,
)
from podwire.agent.engine import (
    fastpath,
    ipc,
    loop,
)
from podwire.agent.engine import (
    timers as timers_mod,
)
from podwire.agent.engine import (
    tun as tun_mod,
)
from podwire.agent.engine import (
    udp as udp_mod,
)

PROG = "podwire-engine"
TIMERS_ENV = "PODWIRE_ENGINE_TIMERS"
FOREGROUND_ENV = "WG_PROCESS_FOREGROUND"
# Where the engine writes its log itself, rotating it past a size (set by the agent).
LOG_FILE_ENV = "PODWIRE_ENGINE_LOG_FILE"
OFFLOADS_ENV = "PODWIRE_ENGINE_OFFLOADS"
STEERING_ENV = "PODWIRE_ENGINE_STEERING"
LOG_MAX_BYTES_ENV = "PODWIRE_ENGINE_LOG_MAX_BYTES"
DEFAULT_LOG_MAX_BYTES = 16 * 1024 * 1024
# wireguard-go's LOG_LEVEL names, as podwire.agent.log's levels.
_LEVELS = {
    "debug": "debug",
    "verbose": "debug",
    "info": "info",
    "error": "error",
    "silent": "critical",
}
_READY = b"ready"


class StartError(RuntimeError):
    """The engine could not start; the message is for the user who started it."""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        timers = timers_from_env(os.environ.get(TIMERS_ENV, ""))
    except ValueError as exc:
        print(f"{PROG}: {TIMERS_ENV}: {exc}", file=sys.stderr)
        return 1
    if args.foreground or os.environ.get(FOREGROUND_ENV) == "1":
        _configure_logging()
        return _serve_reporting(args.device, timers, _report_to_stderr)
    return _daemonize(args.device, timers)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="podwire's userspace WireGuard.")
    parser.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    parser.add_argument("device", help="the TUN device to create, e.g. podwire_wg0")
    return parser.parse_args(argv)


def timers_from_env(text: str) -> timers_mod.ProtocolTimers:
    """ProtocolTimers with the fields named in "name=value,..." replaced (the test knob)."""
    base = timers_mod.ProtocolTimers()
    names = {field.name for field in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(f"{item!r} is not name=value with a name from {sorted(names)}")
        current = getattr(base, name.strip())
        changes[name.strip()] = type(current)(value.strip())
    return dataclasses.replace(base, **changes)


def _daemonize(name: str, timers: timers_mod.ProtocolTimers) -> int:
    """Forks; the parent waits for the child's first word on a pipe: ready, or the error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
        if message == _READY:
            return 0
        text = message.decode(errors="replace") or "the engine exited before it was ready"
        print(f"{PROG}: {text}", file=sys.stderr)
        return 1
    code = 1
    try:
        os.close(read_end)
        os.setsid()
        _detach_stdio(keep_output=bool(os.environ.get("LOG_LEVEL")))
        _configure_logging()
        code = _serve_reporting(name, timers, _report_to_pipe(write_end))
    finally:
        os._exit(code)


def _detach_stdio(*, keep_output: bool) -> None:
    # Holding the starter's stdout would keep a `$(podwire-engine wg0)` waiting forever.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if not keep_output:
        os.dup2(null, 1)
        os.dup2(null, 2)
    os.close(null)


def _report_to_pipe(fd: int) -> Callable[[str | None], None]:
    def report(error: str | None) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, _READY if error is None else error.encode())
        with contextlib.suppress(OSError):
            os.close(fd)

    return report


def _report_to_stderr(error: str | None) -> None:
    if error is not None:
        print(f"{PROG}: {error}", file=sys.stderr)


def _serve_reporting(
    name: str, timers: timers_mod.ProtocolTimers, report: Callable[[str | None], None]
) -> int:
    try:
        return serve(name, timers=timers, on_ready=lambda: report(None))
    except StartError as exc:
        log_mod.get("engine").error("engine_start_failed", device=name, error=str(exc))
        report(str(exc))
        return 1


def serve(name: str, *, timers: timers_mod.ProtocolTimers, on_ready: Callable[[], None]) -> int:
    """Creates the device, socket and listen port, calls on_ready, and serves until stopped."""
    offloads = _switched_on(OFFLOADS_ENV)
    steering = _switched_on(STEERING_ENV)
    try:
        tun = tun_mod.Tun.create(name, offloads=offloads)
    except tun_mod.TunError as exc:
        raise StartError(str(exc)) from None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(tun.close)
        path = ipc.socket_path(name)
        try:
            # Listening only once the features file is written: whoever finds the engine
            # (the agent) finds what it has in force too.
            listener = ipc.open_listener(path, listening=False)
        except (ipc.SocketInUseError, OSError) as exc:
            raise StartError(f"cannot open the UAPI socket {path}: {exc}") from None
        cleanup.callback(ipc.remove_socket, path, listener)
        try:
            bind = udp_mod.UdpBind.open(0, offloads=offloads, steering=steering)
        except OSError as exc:
            raise StartError(f"cannot open a UDP socket: {exc.strerror}") from None
        cleanup.callback(bind.close)
        device = device_mod.Device(rng=os.urandom, wall_clock=time.time, timers=timers)
        device.mtu = tun.mtu()
        features = ipc.features_path(path)
        cleanup.callback(ipc.remove_features, features)
        engine = loop.Engine(
            device=device,
            tun=tun,
            bind=bind,
            uapi_listener=listener,
            fast_path=fastpath.name,
            features_path=features,
        )
        cleanup.callback(engine.close)
        _stop_on_signals(engine, cleanup)
        receive_buffer, send_buffer = bind.buffer_sizes()
        engine.log.info(
            "engine_started",
            device=name,
            socket=str(path),
            port=bind.port,
            mtu=device.mtu,
            offloads=engine.offloads(),
            fast_path=fastpath.name,
            native_unavailable=fastpath.unavailable_reason or None,
            udp_receive_buffer=receive_buffer,
            udp_send_buffer=send_buffer,
        )
        engine.publish_features()
        listener.listen(ipc.BACKLOG)
        on_ready()
        engine.run()
        engine.log.info(
            "engine_stopping", device=name, reason=engine.stop_reason, **engine.counters()
        )
    return 0


def _switched_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("off", "0", "false", "no")


def _stop_on_signals(engine: loop.Engine, cleanup: contextlib.ExitStack) -> None:
    # The handler only marks the stop; the wakeup socket makes the poller return at once.
    wake_read, wake_write = socket.socketpair()
    for sock in (wake_read, wake_write):
        sock.setblocking(False)
        cleanup.callback(sock.close)
    previous_fd = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
    cleanup.callback(signal.set_wakeup_fd, previous_fd)
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.signal(signum, lambda sig, _frame: engine.stop(signal.Signals(sig).name))
        cleanup.callback(signal.signal, signum, previous)
    engine.add_wakeup(wake_read, lambda: None)


def _configure_logging() -> None:
    level = _LEVELS.get(os.environ.get("LOG_LEVEL", "info").lower(), "info")
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        log_mod.configure(level=level)
        return
    # The agent starts the engine with its log on the host: kept bounded however long it runs.
    try:
        limit = int(os.environ.get(LOG_MAX_BYTES_ENV, "") or DEFAULT_LOG_MAX_BYTES)
    except ValueError:
        limit = DEFAULT_LOG_MAX_BYTES
    log_mod.configure(
        level=level, stream=log_mod.rotating_file(path, max_bytes=max(limit, 4096)), json=True
    )


if __name__ == "__main__":
    sys.exit(main())
