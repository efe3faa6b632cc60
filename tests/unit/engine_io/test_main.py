"""The test knob that shortens the protocol's timers, and the command line."""

from __future__ import annotations

import json
import pathlib

import pytest

from podwire.agent import log as log_mod
from podwire.agent.engine import main, timers


def test_timers_default_and_shortened() -> None:
    assert main.timers_from_env("") == timers.ProtocolTimers()
    short = main.timers_from_env(
        "rekey_after_time=6, reject_after_time=10,rekey_after_messages=100"
    )
    assert (short.rekey_after_time, short.reject_after_time, short.rekey_after_messages) == (
        6.0,
        10.0,
        100,
    )
    assert short.keepalive_timeout == timers.ProtocolTimers().keepalive_timeout


@pytest.mark.parametrize("text", ["nonsense=1", "rekey_after_time", "rekey_after_time=soon"])
def test_timers_refuse_what_they_do_not_know(text: str) -> None:
    with pytest.raises(ValueError):
        main.timers_from_env(text)


def test_a_bad_timer_knob_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(main.TIMERS_ENV, "nonsense=1")
    assert main.main(["-f", "wgx"]) == 1
    assert main.TIMERS_ENV in capsys.readouterr().err


def test_a_long_running_engine_keeps_its_log_bounded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # The agent starts the engine with its log on the host: however long the engine runs,
    # the log and the one rotation kept stay near the limit.
    path = tmp_path / "podwire_wg0-engine.log"
    monkeypatch.setenv("PODWIRE_ENGINE_LOG_FILE", str(path))
    monkeypatch.setenv("PODWIRE_ENGINE_LOG_MAX_BYTES", "4096")
    try:
        main._configure_logging()
        logger = log_mod.get("engine")
        for i in range(500):
            logger.info("handshake_completed", peer=f"peer-{i}")
    finally:
        log_mod.configure()
    rotated = path.with_name(path.name + ".1")
    assert rotated.exists(), "the log was never rotated"
    assert path.stat().st_size <= 4096 and rotated.stat().st_size <= 4096
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["event"] == "handshake_completed" and last["peer"] == "peer-499"
