"""The sandbox's private key files: 0600 from the first byte, whole, and gone when asked."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from podwire.sandbox import tools

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="


@pytest.fixture
def open_umask() -> object:
    previous = os.umask(0)  # what a careless write would make world-readable
    yield
    os.umask(previous)


def test_a_key_file_is_0600_and_holds_the_key(tmp_path: pathlib.Path, open_umask: object) -> None:
    path = tools.write_private_key(tmp_path / "wg0.key", KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == KEY + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wg0.key"]


def test_a_key_file_is_never_readable_by_others_on_its_way(
    tmp_path: pathlib.Path, open_umask: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stale temporary file from an interrupted write, world-readable: it must not lend its
    # mode to the new key.
    stale = tmp_path / ".wg0.key.tmp"
    stale.write_text("old")
    stale.chmod(0o644)
    seen: list[int] = []
    replace = os.replace

    def watching_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    tools.write_private_key(tmp_path / "wg0.key", KEY)
    assert seen == [0o600]


def test_a_throwaway_key_file_is_removed_after_use_even_on_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "wg0.key"
    with tools.private_key_file(path, KEY) as keyfile:
        assert keyfile.read_text() == KEY + "\n"
    assert not path.exists()
    with pytest.raises(RuntimeError), tools.private_key_file(path, KEY):
        raise RuntimeError("wg set failed")
    assert list(tmp_path.iterdir()) == []
