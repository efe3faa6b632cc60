"""The operator's settings: durations as Kubernetes writes them, and a bad one stops it at once
with exit code 2 and a message naming the flag."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from podwire.operator import config

BIN = pathlib.Path(sys.executable).parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("24h", 86400),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("2d", 172800),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration("--x", text) == seconds


@pytest.mark.parametrize("text", ["", "30", "5 m", "m5", "24hours", "-5s", "1h 30m", "0s", "s"])
def test_malformed_durations_name_the_flag(text: str) -> None:
    with pytest.raises(config.ConfigError, match=r"^--rotation-deadline: must be"):
        config.parse_duration("--rotation-deadline", text)


def test_off_is_zero_where_off_is_allowed() -> None:
    for text in ("", "0", "0s"):
        assert config.parse_duration("--key-rotation-interval", text, allow_zero=True) == 0


def test_defaults() -> None:
    cfg = config.load([], env={"POD_NAME": "podwire-operator-abc"})
    assert cfg.identity == "podwire-operator-abc"
    assert (cfg.lease_duration, cfg.renew_period, cfg.renew_deadline) == (15, 5, 10)
    assert cfg.key_rotation_interval == 0  # off
    assert cfg.rotation_deadline == 120
    assert (cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", 9872)
    assert cfg.namespace == "kube-system"


def test_flags_win_over_the_environment() -> None:
    env = {"PODWIRE_KEY_ROTATION_INTERVAL": "1h", "POD_NAMESPACE": "podwire"}
    cfg = config.load(["--key-rotation-interval", "24h"], env=env)
    assert cfg.key_rotation_interval == 86400
    assert cfg.namespace == "podwire"


def test_without_a_pod_name_the_identity_is_host_and_pid() -> None:
    assert "_" in config.load([], env={}).identity


@pytest.mark.parametrize(
    ("argv", "env", "blamed"),
    [
        (["--lease-duration", "15"], {}, "--lease-duration"),
        (
            [],
            {"PODWIRE_ROTATION_DEADLINE": "2 minutes"},
            "--rotation-deadline (env PODWIRE_ROTATION_DEADLINE)",
        ),
        (["--renew-period", "12s"], {}, "--renew-period"),
        (["--metrics-address", "9872"], {}, "--metrics-address"),
        (["--namespace", "Kube_System"], {}, "--namespace"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], {}, "--kubeconfig"),
    ],
)
def test_bad_settings_are_refused_naming_them(
    argv: list[str], env: dict[str, str], blamed: str
) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(argv, env=env)
    assert caught.value.setting == blamed


def test_metrics_addresses() -> None:
    assert config.parse_address("--m", ":9872") == ("0.0.0.0", 9872)
    assert config.parse_address("--m", "127.0.0.1:0") == ("127.0.0.1", 0)
    assert config.parse_address("--m", "[::]:9872") == ("::", 9872)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--key-rotation-interval", "24x"],
            "--key-rotation-interval: must be a duration such as 30s",
        ),
        (["--rotation-deadline", "0s"], "--rotation-deadline: must be longer than 0"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_the_command_exits_2_and_says_which_flag(argv: list[str], says: str) -> None:
    proc = subprocess.run(
        [str(BIN / "podwire-operator"), *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert says in proc.stderr
