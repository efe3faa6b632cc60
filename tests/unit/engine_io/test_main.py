"""The test knob that shortens the protocol's timers, and the command line."""

from __future__ import annotations

import pytest

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
