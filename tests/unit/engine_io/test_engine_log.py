"""The engine's log on the host is bounded: the agent rotates it to one `.1` at each start."""

from __future__ import annotations

import pathlib
import sys

import pytest

from podwire.agent.datapath import supervisor


class StartsAlive:
    """A UAPI client that finds no engine, then the one just started."""

    def __init__(self) -> None:
        self.calls = 0

    def alive(self) -> bool:
        self.calls += 1
        return self.calls > 1


def _start(log: pathlib.Path) -> None:
    engine = supervisor.Engine(
        device="wgx",
        client=StartsAlive(),  # type: ignore[arg-type]
        command=(sys.executable, "-c", "import sys; print('started', sys.argv[1])"),
        log_path=log,
    )
    engine.ensure_running()
    assert engine.process is not None
    engine.process.wait(timeout=10)


def test_a_log_past_its_limit_is_rotated_at_start(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "LOG_LIMIT", 1000, raising=False)
    log = tmp_path / "engine.log"
    log.write_bytes(b"old\n" * 400)  # 1600 bytes
    (tmp_path / "engine.log.1").write_bytes(b"older\n")
    _start(log)
    assert (tmp_path / "engine.log.1").read_bytes() == b"old\n" * 400
    assert log.read_bytes() == b"started wgx\n"
    # Under the limit, the log is appended to.
    _start(log)
    assert log.read_bytes() == b"started wgx\n" * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.log", "engine.log.1"]
