"""The agent's settings: every knob in one checked place, read once at start.

A DaemonSet agent is configured by its pod spec (environment variables, from the Helm chart)
and optionally a file (a ConfigMap); a typo or an out-of-range value there must stop the agent
with a message that names the setting and what it may be, not surface later as a strange
datapath error. So a `Config` is valid by construction: `__post_init__` checks every field,
and the loaders only convert text to the right types.

Precedence: defaults, then the file (PODWIRE_CONFIG or `path=`), then environment variables.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias, get_args

from podwire.api import wgnode

Datapath: TypeAlias = Literal["auto", "kernel", "userspace"]
# Who runs the userspace engine. child: the agent starts one when none serves the device (a
# process that outlives the agent, but not the agent's container). external: never the agent;
# the engine's own DaemonSet runs it, so restarting or upgrading the agent's container leaves
# it, and its traffic, alone; the agent waits for its UAPI socket.
EngineMode: TypeAlias = Literal["child", "external"]
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_KEY_PATH: Final = pathlib.Path("/var/lib/podwire/private.key")
DEFAULT_DEVICE: Final = "podwire_wg0"
MAX_LANES: Final = 8
LANE_SUFFIX: Final = "_"  # lane i's device is the device's name, then this and i (lane 0: none)
DEFAULT_LISTEN_PORT: Final = wgnode.DEFAULT_LISTEN_PORT
DEFAULT_API_SOCKET: Final = pathlib.Path("/var/run/podwire/agent.sock")
DEFAULT_METRICS_PORT: Final = 9871
# /healthz, /readyz and /metrics on every address of the node: Prometheus scrapes from another
# host, and what they show (node names, public keys, counters) is no secret. Set 127.0.0.1 on a
# node that is not scraped: the kubelet's probes reach loopback.
DEFAULT_METRICS_ADDRESS: Final = "0.0.0.0"
DEFAULT_RESYNC_PERIOD: Final = 300.0

# The smallest MTU IPv4 hosts must accept; IPv6 pods need 1280, which the operator of an
# IPv4-only cluster may not care about.
MIN_MTU: Final = 576
MAX_MTU: Final = 65535

CONFIG_FILE_ENV: Final = "PODWIRE_CONFIG"

_BOOL_WORDS: Final = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}
_BOOL_ALLOWED: Final = "true/false (also 1/0, yes/no, on/off)"
# RFC 1123 subdomain, as Kubernetes requires of Node names.
_NODE_NAME_RE: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_IFNAMSIZ: Final = 16


class ConfigError(ValueError):
    """A setting with a bad value; `setting` is its name as the user wrote it."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"config {setting}: {message}")
        self.setting = setting


@dataclasses.dataclass(frozen=True, slots=True)
class Features:
    """Kernel datapath features; each is still applied only where the kernel supports it."""

    gro: bool = True
    big_tcp: bool = True
    udp_gro_forwarding: bool = True
    # Threaded NAPI on the kernel WireGuard device, so its receive work can move off the core
    # the packets arrived on (Calico does the same); sysfs `threaded`, Linux 5.12.
    threaded_napi: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    key_path: pathlib.Path = DEFAULT_KEY_PATH
    datapath: Datapath = "auto"
    listen_port: int = DEFAULT_LISTEN_PORT
    device: str = DEFAULT_DEVICE
    # The whole cluster's pod range: the fail-closed route drops what no peer covers in it.
    cluster_pod_cidrs: tuple[IPNetwork, ...] = ()
    fail_closed: bool = True
    # Routes to the cluster pod CIDRs in podwire's own table, consulted before main, so that no
    # other program's more specific route takes a peer's pods (nor, with fail_closed, any
    # remote pod) past the device; what arrives on the underlay in clear from the pod range for
    # a local pod is dropped. Acts on cluster_pod_cidrs: without them there is nothing to guard.
    strict_mode: bool = True
    mtu: int = 0  # 0: the underlay's MTU minus WireGuard's overhead
    features: Features = Features()
    api_socket: pathlib.Path = DEFAULT_API_SOCKET
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    resync_period: float = DEFAULT_RESYNC_PERIOD
    kubeconfig: pathlib.Path | None = None  # None: the in-cluster service account
    # The userspace engine to start when the device has none: podwire-engine by default; any
    # program with wireguard-go's command line and UAPI socket will do (benchmarks use that).
    engine: pathlib.Path | None = None
    engine_mode: EngineMode = "child"
    # WireGuard devices per node, each with its own key and port (listen_port + i): all
    # traffic between two nodes over one device is one UDP flow, received on one core; routes
    # to a remote node's pods spread flows over the lanes both nodes have (see `lanes`). On
    # userspace each lane has an engine of its own: the agent's child, or in engine mode
    # external one the engine's DaemonSet runs per lane (`podwire-engine <device>_<i>`).
    lanes: int = 1

    def __post_init__(self) -> None:
        _check_node_name(self.node_name)
        if self.datapath not in get_args(Datapath):
            raise ConfigError(
                "datapath", f"must be one of {', '.join(get_args(Datapath))}, got {self.datapath!r}"
            )
        if self.engine_mode not in get_args(EngineMode):
            raise ConfigError(
                "engine_mode",
                f"must be one of {', '.join(get_args(EngineMode))}, got {self.engine_mode!r}",
            )
        _check_port("listen_port", self.listen_port)
        _check_device(self.device)
        _check_lanes(self)
        if self.fail_closed and not self.cluster_pod_cidrs:
            # Fail-closed without a range to close would look safe and drop nothing.
            raise ConfigError(
                "cluster_pod_cidrs",
                "is empty but fail_closed is on: give the cluster's pod CIDRs"
                " (e.g. 10.244.0.0/16,fd00:10:244::/56), or turn fail_closed off",
            )
        if self.mtu != 0 and not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(
                "mtu", f"must be 0 (automatic) or in {MIN_MTU}..{MAX_MTU}, got {self.mtu}"
            )
        _check_port("metrics_port", self.metrics_port)
        try:
            ipaddress.ip_address(self.metrics_address)
        except ValueError:
            raise ConfigError(
                "metrics_address",
                f"must be an IP address to listen on (0.0.0.0, 127.0.0.1, ::), got"
                f" {self.metrics_address!r}",
            ) from None
        if not self.resync_period > 0:
            raise ConfigError(
                "resync_period", f"must be a positive number of seconds, got {self.resync_period}"
            )
        if not str(self.key_path) or not str(self.api_socket):
            raise ConfigError("key_path/api_socket", "must not be empty")

    def lane_device(self, lane: int) -> str:
        """Lane `lane`'s device: lane 0 keeps the device's name, so one lane is what it was."""
        return self.device if lane == 0 else f"{self.device}{LANE_SUFFIX}{lane}"

    def lane_key_path(self, lane: int) -> pathlib.Path:
        """Lane `lane`'s private key file, beside lane 0's (private.key -> private-lane1.key)."""
        if lane == 0:
            return self.key_path
        path = self.key_path
        return path.with_name(f"{path.stem}-lane{lane}{path.suffix}")

    def lane_port(self, lane: int) -> int:
        return self.listen_port + lane


def from_mapping(data: Mapping[str, Any], *, base: Mapping[str, Any] | None = None) -> Config:
    """A Config from a mapping of setting names to values (a parsed file, or test input).

    Values may be of their own type or text (as in environment variables). Unknown settings are
    refused, so a misspelled one is not silently ignored.
    """
    merged: dict[str, Any] = dict(base or {})
    for key, value in data.items():
        if key == "features":
            merged["features"] = {**merged.get("features", {}), **_features_mapping(value)}
        else:
            merged[key] = value
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ConfigError(
            unknown[0], f"is not a setting; the settings are {', '.join(sorted(fields))}"
        )
    if "node_name" not in merged:
        raise ConfigError("node_name", "is required (set NODE_NAME from the downward API)")
    kwargs: dict[str, Any] = {}
    for name, value in merged.items():
        kwargs[name] = _CONVERT[name](name, value)
    return Config(**kwargs)


# Environment variable -> setting. NODE_NAME and KUBECONFIG keep the names every Kubernetes
# tool uses; everything else is podwire's own.
ENV_VARS: Final[Mapping[str, str]] = {
    "NODE_NAME": "node_name",
    "PODWIRE_KEY_PATH": "key_path",
    "PODWIRE_DATAPATH": "datapath",
    "PODWIRE_LISTEN_PORT": "listen_port",
    "PODWIRE_DEVICE": "device",
    "PODWIRE_CLUSTER_POD_CIDRS": "cluster_pod_cidrs",
    "PODWIRE_FAIL_CLOSED": "fail_closed",
    "PODWIRE_STRICT_MODE": "strict_mode",
    "PODWIRE_MTU": "mtu",
    "PODWIRE_API_SOCKET": "api_socket",
    "PODWIRE_METRICS_PORT": "metrics_port",
    "PODWIRE_METRICS_ADDRESS": "metrics_address",
    "PODWIRE_RESYNC_PERIOD": "resync_period",
    "KUBECONFIG": "kubeconfig",
    "PODWIRE_ENGINE": "engine",
    "PODWIRE_ENGINE_MODE": "engine_mode",
    "PODWIRE_LANES": "lanes",
}
FEATURE_ENV_VARS: Final[Mapping[str, str]] = {
    "PODWIRE_GRO": "gro",
    "PODWIRE_BIG_TCP": "big_tcp",
    "PODWIRE_UDP_GRO_FORWARDING": "udp_gro_forwarding",
    "PODWIRE_THREADED_NAPI": "threaded_napi",
}


def load(
    *,
    environ: Mapping[str, str] | None = None,
    path: os.PathLike[str] | str | None = None,
) -> Config:
    """The agent's Config: the file (`path`, else $PODWIRE_CONFIG, if any), then the environment.

    Empty environment variables count as unset, as a Helm template often renders them.
    """
    env = os.environ if environ is None else environ
    file_settings: dict[str, Any] = {}
    file_path = path if path is not None else env.get(CONFIG_FILE_ENV) or None
    if file_path is not None:
        file_settings = dict(read_file(file_path))
    env_settings: dict[str, Any] = {
        setting: env[var] for var, setting in ENV_VARS.items() if env.get(var)
    }
    features = {name: env[var] for var, name in FEATURE_ENV_VARS.items() if env.get(var)}
    if features:
        env_settings["features"] = features
    return from_mapping(env_settings, base=_normalize_features(file_settings))


def read_file(path: os.PathLike[str] | str) -> Mapping[str, Any]:
    """Settings from a JSON file, or YAML (.yaml/.yml) when PyYAML is installed."""
    path = pathlib.Path(path)
    setting = f"file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(setting, f"cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(setting, "is not UTF-8 text") from None
    data: object
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # only for a YAML file; JSON needs nothing outside the stdlib
        except ImportError:
            raise ConfigError(setting, "is YAML but PyYAML is not installed: use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(setting, f"is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(setting, f"is not valid JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise ConfigError(setting, "must hold an object of settings at the top level")
    return data


def parse_bool(setting: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(setting, f"must be {_BOOL_ALLOWED}, got {value!r}")


def _normalize_features(settings: dict[str, Any]) -> dict[str, Any]:
    if "features" in settings:
        settings = {**settings, "features": _features_mapping(settings["features"])}
    return settings


def _features_mapping(value: object) -> dict[str, Any]:
    if isinstance(value, Features):
        return dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ConfigError("features", f"must be an object of toggles, got {value!r}")
    return dict(value)


def _to_features(setting: str, value: object) -> Features:
    toggles = _features_mapping(value)
    names = [f.name for f in dataclasses.fields(Features)]
    for key in toggles:
        if key not in names:
            raise ConfigError(
                f"features.{key}", f"is not a feature; the features are {', '.join(names)}"
            )
    return Features(**{k: parse_bool(f"features.{k}", v) for k, v in toggles.items()})


def _to_int(setting: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(setting, f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    raise ConfigError(setting, f"must be an integer, got {value!r}")


def _to_seconds(setting: str, value: object) -> float:
    if isinstance(value, bool):
        raise ConfigError(setting, f"must be a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(setting, f"must be a number of seconds, got {value!r}")


def _to_str(setting: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(setting, f"must be a string, got {value!r}")
    return value.strip()


def _to_path(setting: str, value: object) -> pathlib.Path:
    text = value if isinstance(value, pathlib.Path) else _to_str(setting, value)
    if not str(text):
        raise ConfigError(setting, "must be a path, got an empty string")
    return pathlib.Path(text)


def _to_optional_path(setting: str, value: object) -> pathlib.Path | None:
    return None if value is None or value == "" else _to_path(setting, value)


def _to_cidrs(setting: str, value: object) -> tuple[IPNetwork, ...]:
    items: list[object]
    if isinstance(value, str):
        items = [part for part in (p.strip() for p in value.split(",")) if part]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(setting, f"must be a list of CIDRs, got {value!r}")
    out: list[IPNetwork] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            out.append(item)
            continue
        try:
            out.append(ipaddress.ip_network(_to_str(setting, item), strict=True))
        except ValueError as exc:
            raise ConfigError(
                setting, f"{item!r} is not a CIDR with its host bits zero ({exc})"
            ) from None
    return tuple(out)


_CONVERT: Final[Mapping[str, Any]] = {
    "node_name": _to_str,
    "key_path": _to_path,
    "datapath": _to_str,
    "listen_port": _to_int,
    "device": _to_str,
    "cluster_pod_cidrs": _to_cidrs,
    "fail_closed": parse_bool,
    "strict_mode": parse_bool,
    "mtu": _to_int,
    "features": _to_features,
    "api_socket": _to_path,
    "metrics_port": _to_int,
    "metrics_address": _to_str,
    "resync_period": _to_seconds,
    "kubeconfig": _to_optional_path,
    "engine": _to_optional_path,
    "engine_mode": _to_str,
    "lanes": _to_int,
}


def _check_node_name(name: str) -> None:
    if not name:
        raise ConfigError("node_name", "is required (set NODE_NAME from the downward API)")
    if len(name) > 253 or not _NODE_NAME_RE.fullmatch(name):
        raise ConfigError(
            "node_name",
            f"must be a Kubernetes Node name (lowercase letters, digits, '-' and '.'), got {name!r}",
        )


def _check_port(setting: str, port: int) -> None:
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(setting, f"must be a port in 1..65535, got {port!r}")


def _check_lanes(cfg: Config) -> None:
    if isinstance(cfg.lanes, bool) or not 1 <= cfg.lanes <= MAX_LANES:
        raise ConfigError("lanes", f"must be in 1..{MAX_LANES}, got {cfg.lanes!r}")
    if cfg.lanes == 1:
        return
    last = f"{cfg.device}{LANE_SUFFIX}{cfg.lanes - 1}"
    if len(last) >= _IFNAMSIZ:
        raise ConfigError(
            "lanes",
            f"lane {cfg.lanes - 1}'s device would be {last!r}, longer than 15 characters:"
            f" give a shorter device name (at most {_IFNAMSIZ - 1 - len(last) + len(cfg.device)})",
        )
    if cfg.listen_port + cfg.lanes - 1 > 65535:
        raise ConfigError(
            "lanes", f"lane {cfg.lanes - 1} would listen on {cfg.listen_port + cfg.lanes - 1}"
        )


def _check_device(name: str) -> None:
    # The kernel's dev_valid_name(): under IFNAMSIZ, no '/', ':' or whitespace, not . or ..
    if (
        not name
        or len(name) >= _IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:")
        or any(c.isspace() for c in name)
    ):
        raise ConfigError(
            "device",
            f"must be a network interface name (1-15 characters, no '/', ':' or spaces),"
            f" got {name!r}",
        )
