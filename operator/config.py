"""The operator's settings: flags, then environment variables, then defaults; checked once.

A Deployment configures the operator with flags (the chart's command line) or environment
variables; a typo there must stop it at start with a message that names the flag and says what
it may be (exit code 2), not turn into a rotation that never ends or a lease nobody can hold.
Durations are written as Kubernetes users write them: 30s, 5m, 24h, 1h30m, 500ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Final

DEFAULT_NAMESPACE: Final = "kube-system"
LEASE_NAME: Final = "podwire-operator"
DEFAULT_METRICS_ADDRESS: Final = "0.0.0.0:9872"
# Kubernetes' own controllers use the same lease timing (client-go's defaults: 15 s, renew
# within 10 s); we renew every 5 s so that one lost request never costs the lease.
DEFAULT_LEASE_DURATION: Final = 15.0
DEFAULT_RENEW_PERIOD: Final = 5.0
DEFAULT_ROTATION_DEADLINE: Final = 120.0
# A Node deleted and created again (a node replaced under the same name) keeps its
# WireguardNode when it is back within this grace.
DEFAULT_STALE_GRACE: Final = 30.0
DEFAULT_RESYNC: Final = 2.0

_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class ConfigError(ValueError):
    """A setting with a bad value; `setting` is the flag as the user wrote it (or its env)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def parse_duration(setting: str, text: str, *, allow_zero: bool = False) -> float:
    """Seconds from 30s, 5m, 24h, 1h30m, 500ms (units required, as Kubernetes writes them);
    "0" and "" mean off where allow_zero."""
    text = text.strip()
    if allow_zero and text in ("", "0"):
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ConfigError(setting, f"must be a duration such as 30s, 5m or 24h, got {text!r}")
    if total <= 0 and not allow_zero:
        raise ConfigError(setting, f"must be longer than 0, got {text!r}")
    return total


def parse_address(setting: str, text: str) -> tuple[str, int]:
    """host:port, :port (every address) or [v6]:port; port 0 asks the kernel for one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(setting, f"must be host:port, :port or [::]:port, got {text!r}")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    namespace: str = DEFAULT_NAMESPACE
    identity: str = ""
    lease_name: str = LEASE_NAME
    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_period: float = DEFAULT_RENEW_PERIOD
    key_rotation_interval: float = 0.0  # off
    rotation_deadline: float = DEFAULT_ROTATION_DEADLINE
    stale_grace: float = DEFAULT_STALE_GRACE
    resync: float = DEFAULT_RESYNC
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9872
    kubeconfig: str | None = None
    log_level: str = "info"

    @property
    def retry_period(self) -> float:
        """How often a replica that waits looks at the lease."""
        return min(2.0, self.lease_duration / 5)

    @property
    def renew_deadline(self) -> float:
        """A leader that could not renew for this long stops acting, well before its lease
        runs out for the others."""
        return self.lease_duration * 2 / 3


# (flag, environment variable, help); the environment is what a Deployment sets most easily.
_SETTINGS: Final = (
    ("--namespace", "POD_NAMESPACE", "namespace of the leader-election Lease"),
    ("--identity", "POD_NAME", "holder identity in the Lease (default: hostname_pid)"),
    ("--lease-duration", "PODWIRE_LEASE_DURATION", "how long a lease lasts without renewal"),
    ("--renew-period", "PODWIRE_RENEW_PERIOD", "how often the leader renews"),
    (
        "--key-rotation-interval",
        "PODWIRE_KEY_ROTATION_INTERVAL",
        "rotate keys older than this (0: off)",
    ),
    (
        "--rotation-deadline",
        "PODWIRE_ROTATION_DEADLINE",
        "how long one node's rotation may take",
    ),
    (
        "--stale-grace",
        "PODWIRE_STALE_GRACE",
        "how long a Node must be gone before its WireguardNode is removed",
    ),
    ("--resync", "PODWIRE_RESYNC", "how often the leader looks at everything"),
    (
        "--metrics-address",
        "PODWIRE_METRICS_ADDRESS",
        "host:port of /healthz, /readyz, /metrics",
    ),
    ("--kubeconfig", "KUBECONFIG", "a kubeconfig (default: the in-cluster service account)"),
    ("--log-level", "PODWIRE_LOG_LEVEL", "debug, info, warning or error"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="podwire-operator",
        description="Removes stale WireguardNodes, flags duplicate keys and overlapping pod "
        "CIDRs, and rotates node keys one node at a time. Durations: 30s, 5m, 24h.",
    )
    for flag, env, text in _SETTINGS:
        p.add_argument(flag, help=f"{text} (env {env})")
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The Config from argv and env; raises ConfigError naming the flag. (argparse itself
    exits 2 for an unknown flag.)"""
    env = os.environ if env is None else env
    args = vars(_parser().parse_args(argv))
    raw: dict[str, tuple[str, str]] = {}  # setting -> (name to blame, text)
    for flag, var, _ in _SETTINGS:
        value = args[flag[2:].replace("-", "_")]
        if value is not None:
            raw[flag] = (flag, value)
        elif env.get(var):
            raw[flag] = (f"{flag} (env {var})", env[var])
    return _build(raw)


def _build(raw: Mapping[str, tuple[str, str]]) -> Config:
    def duration(flag: str, default: float, *, allow_zero: bool = False) -> float:
        if flag not in raw:
            return default
        return parse_duration(raw[flag][0], raw[flag][1], allow_zero=allow_zero)

    def text(flag: str, default: str) -> str:
        return raw[flag][1].strip() if flag in raw else default

    host, port = parse_address(*raw.get("--metrics-address", ("", DEFAULT_METRICS_ADDRESS)))
    cfg = Config(
        namespace=text("--namespace", DEFAULT_NAMESPACE),
        identity=text("--identity", "") or f"{socket.gethostname()}_{os.getpid()}",
        lease_duration=duration("--lease-duration", DEFAULT_LEASE_DURATION),
        renew_period=duration("--renew-period", DEFAULT_RENEW_PERIOD),
        key_rotation_interval=duration("--key-rotation-interval", 0.0, allow_zero=True),
        rotation_deadline=duration("--rotation-deadline", DEFAULT_ROTATION_DEADLINE),
        stale_grace=duration("--stale-grace", DEFAULT_STALE_GRACE, allow_zero=True),
        resync=duration("--resync", DEFAULT_RESYNC),
        metrics_host=host,
        metrics_port=port,
        kubeconfig=text("--kubeconfig", "") or None,
        log_level=text("--log-level", "info").lower(),
    )
    _check(cfg, raw)
    return cfg


def _check(cfg: Config, raw: Mapping[str, tuple[str, str]]) -> None:
    def blame(flag: str) -> str:
        return raw[flag][0] if flag in raw else flag

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cfg.namespace):
        raise ConfigError(blame("--namespace"), f"is not a namespace name: {cfg.namespace!r}")
    if cfg.lease_duration < 2:
        raise ConfigError(blame("--lease-duration"), "must be at least 2s")
    if cfg.renew_period >= cfg.renew_deadline:
        raise ConfigError(
            blame("--renew-period"),
            f"must be shorter than two thirds of --lease-duration ({cfg.renew_deadline:g}s),"
            f" so that a failed renewal can be retried before the lease runs out",
        )
    if cfg.kubeconfig is not None and not os.access(cfg.kubeconfig, os.R_OK):
        raise ConfigError(blame("--kubeconfig"), f"cannot read {cfg.kubeconfig}")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(blame("--log-level"), "must be debug, info, warning or error")
