"""The node key file: created once, reused, written atomically, and never silently replaced."""

from __future__ import annotations

import base64
import os
import pathlib
import pickle
import shutil
import stat
import subprocess

import pytest

from podwire.agent import keys


@pytest.fixture
def key_path(tmp_path: pathlib.Path) -> pathlib.Path:
    # A folder that does not exist yet, as on a fresh node.
    return tmp_path / "var" / "lib" / "podwire" / "private.key"


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret(key: keys.PrivateKey) -> list[str]:
    """Every spelling of the secret a leak could take."""
    return [key.to_b64(), key.raw.hex(), repr(key.raw), base64.b64encode(key.raw).decode()[:20]]


def test_first_start_creates_the_key_with_tight_modes(key_path: pathlib.Path) -> None:
    key = keys.load_or_create(key_path)
    assert _mode(key_path) == 0o600
    assert _mode(key_path.parent) == 0o700
    text = key_path.read_text()
    assert len(text) == 45 and text.endswith("=\n")
    assert text.strip() == key.to_b64()
    assert os.listdir(key_path.parent) == ["private.key"]  # no temp file left behind


def test_restart_reuses_the_key(key_path: pathlib.Path) -> None:
    first = keys.load_or_create(key_path)
    again = keys.load_or_create(key_path)
    assert again == first
    assert again.public_key_b64() == first.public_key_b64()


def test_key_is_clamped_like_wg_genkey(key_path: pathlib.Path) -> None:
    raw = keys.load_or_create(key_path).raw
    assert raw[0] & 7 == 0
    assert raw[31] & 0x80 == 0 and raw[31] & 0x40


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_wg_reads_our_file_and_agrees_on_the_public_key(key_path: pathlib.Path) -> None:
    key = keys.load_or_create(key_path)
    with key_path.open() as f:
        out = subprocess.run(["wg", "pubkey"], stdin=f, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key.public_key_b64()


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_we_read_a_file_written_by_wg_genkey(key_path: pathlib.Path) -> None:
    key_path.parent.mkdir(parents=True, mode=0o700)
    genkey = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
    key_path.write_text(genkey.stdout)
    key_path.chmod(0o600)
    pub = subprocess.run(
        ["wg", "pubkey"], input=genkey.stdout, capture_output=True, text=True, check=True
    )
    assert keys.load_or_create(key_path).public_key_b64() == pub.stdout.strip()


def test_an_existing_folder_readable_by_others_is_tightened_to_0700(key_path: pathlib.Path) -> None:
    # What a hostPath of type DirectoryOrCreate makes: root's, 0755.
    key_path.parent.mkdir(parents=True, mode=0o755)
    key_path.parent.chmod(0o755)
    keys.load_or_create(key_path)
    assert _mode(key_path.parent) == 0o700
    key_path.parent.chmod(0o755)
    keys.load(key_path)  # checked at every load, not only when the key is made
    assert _mode(key_path.parent) == 0o700


def test_a_group_writable_folder_is_refused_at_every_load(key_path: pathlib.Path) -> None:
    keys.load_or_create(key_path)
    key_path.parent.chmod(0o770)
    for load in (keys.load, keys.load_or_create):
        with pytest.raises(keys.KeyFileError, match="chmod 700"):
            load(key_path)
    assert _mode(key_path.parent) == 0o770  # a key someone could swap is not "fixed" silently


def test_a_folder_of_another_owner_is_refused(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.load_or_create(key_path)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(keys.KeyFileError, match=r"folder .* is owned by uid"):
        keys.load(key_path)


def test_a_key_file_behind_a_symlink_is_refused(
    key_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    elsewhere = tmp_path / "elsewhere" / "private.key"
    key = keys.load_or_create(elsewhere)
    keys.load_or_create(key_path)
    key_path.unlink()
    key_path.symlink_to(elsewhere)
    for load in (keys.load, keys.load_or_create):
        with pytest.raises(keys.KeyFileError, match="symbolic link") as err:
            load(key_path)
        assert key.to_b64() not in str(err.value)
    assert key_path.is_symlink()  # left for the user to look at


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_too_open_file_is_refused_and_kept(key_path: pathlib.Path, mode: int) -> None:
    key = keys.load_or_create(key_path)
    key_path.chmod(mode)
    with pytest.raises(keys.KeyFileError) as err:
        keys.load_or_create(key_path)
    message = str(err.value)
    assert str(key_path) in message
    assert f"{mode:04o}" in message and "chmod 600" in message
    assert keys.PrivateKey.from_b64(key_path.read_text()) == key  # not replaced
    assert _mode(key_path) == mode  # not "fixed" behind the user's back either


def test_group_writable_folder_is_refused(key_path: pathlib.Path) -> None:
    keys.load_or_create(key_path)
    key_path.parent.chmod(0o770)
    with pytest.raises(keys.KeyFileError, match="chmod 700"):
        keys.rotate(key_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (base64.b64encode(bytes(31)) + b"\n", "31 bytes"),
        (base64.b64encode(bytes(33)) + b"\n", "33 bytes"),
        (b"", "0 bytes"),
        (b"not a key at all\n", "not base64"),
        (b"\xff\xfe" * 10, "not ASCII"),
        (b"A" * 300, "too large"),
    ],
)
def test_malformed_file_is_refused_and_kept(
    key_path: pathlib.Path, content: bytes, problem: str
) -> None:
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.write_bytes(content)
    key_path.chmod(0o600)
    with pytest.raises(keys.KeyFileError) as err:
        keys.load_or_create(key_path)
    assert problem in str(err.value)
    assert str(key_path) in str(err.value)
    assert key_path.read_bytes() == content


def test_non_canonical_base64_is_refused(key_path: pathlib.Path) -> None:
    # Same 32 bytes, but the last character's unused bits set: two spellings of one key.
    text = keys.PrivateKey.generate().to_b64()
    sloppy = text[:42] + chr(ord(text[42]) + 1) + "="
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.write_text(sloppy + "\n")
    key_path.chmod(0o600)
    with pytest.raises(keys.KeyFileError, match="canonical"):
        keys.load(key_path)


def test_a_folder_at_the_path_is_refused(key_path: pathlib.Path) -> None:
    key_path.mkdir(parents=True, mode=0o700)
    with pytest.raises(keys.KeyFileError, match="not a regular file"):
        keys.load_or_create(key_path)


def test_unreadable_file_is_reported(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.load_or_create(key_path)
    real_open = os.open

    def deny(path: object, *args: object, **kwargs: object) -> int:
        if os.fspath(path) == str(key_path):  # type: ignore[call-overload]
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    # Tests run as root, for whom a mode never denies a read.
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(keys.KeyFileError, match="permission denied") as err:
        keys.load_or_create(key_path)
    assert str(key_path) in str(err.value)


def test_file_of_another_owner_is_refused(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.load_or_create(key_path)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(keys.KeyFileError, match="owned by uid"):
        keys.load(key_path)


def test_load_of_a_missing_file_says_so(key_path: pathlib.Path) -> None:
    with pytest.raises(keys.KeyFileError, match="does not exist"):
        keys.load(key_path)
    assert not key_path.parent.exists()


def test_rotate_replaces_the_key_atomically_and_keeps_the_old_until_finished(
    key_path: pathlib.Path,
) -> None:
    old = keys.load_or_create(key_path)
    new = keys.rotate(key_path)
    assert new != old
    assert keys.load(key_path) == new
    assert _mode(key_path) == 0o600
    # Until the rotation is complete the old key is kept, as private as the new one.
    assert sorted(os.listdir(key_path.parent)) == ["private.key", "private.key.previous"]
    assert keys.load_previous(key_path) == old
    assert _mode(keys.previous_path(key_path)) == 0o600
    keys.finish_rotation(key_path)
    assert os.listdir(key_path.parent) == ["private.key"]
    assert keys.load_previous(key_path) is None
    keys.finish_rotation(key_path)  # twice (a restart after the removal) is fine


def test_failed_rotation_leaves_the_old_file_whole(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = keys.load_or_create(key_path)
    before = key_path.read_bytes()

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(keys.KeyFileError, match="No space left") as err:
        keys.rotate(key_path)
    assert key_path.read_bytes() == before
    assert keys.load(key_path) == old
    assert os.listdir(key_path.parent) == ["private.key"]  # the temp file was removed
    assert old.to_b64() not in str(err.value)


def test_failed_write_midway_leaves_no_temp_file(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.load_or_create(key_path)
    before = key_path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(keys.KeyFileError, match="Input/output error"):
        keys.rotate(key_path)
    assert key_path.read_bytes() == before
    assert os.listdir(key_path.parent) == ["private.key"]


def test_failed_first_write_leaves_nothing(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: object, dst: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "link", fail)
    with pytest.raises(keys.KeyFileError, match="Read-only file system"):
        keys.load_or_create(key_path)
    assert os.listdir(key_path.parent) == []


def test_a_key_written_concurrently_wins_over_ours(
    key_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another agent process (rolling update with surge) writes its key between our check
    # and our write: we must adopt it, not overwrite it.
    theirs = keys.PrivateKey.generate()
    real_link = os.link

    def racing_link(src: str, dst: str) -> None:
        pathlib.Path(dst).write_text(theirs.to_b64() + "\n")
        pathlib.Path(dst).chmod(0o600)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert keys.load_or_create(key_path) == theirs
    assert os.listdir(key_path.parent) == ["private.key"]


def test_the_secret_never_shows_in_repr_str_or_errors(key_path: pathlib.Path) -> None:
    key = keys.load_or_create(key_path)
    shown = [repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})]
    for text in shown:
        assert key.public_key_b64() in text
        for secret in _secret(key):
            assert secret not in text
    key_path.chmod(0o644)
    with pytest.raises(keys.KeyFileError) as err:
        keys.load(key_path)
    for secret in _secret(key):
        assert secret not in str(err.value)


def test_a_malformed_file_is_never_quoted(key_path: pathlib.Path) -> None:
    # A key with a stray character is still almost the secret: the error describes it only.
    secret = keys.PrivateKey.generate().to_b64()
    key_path.parent.mkdir(parents=True, mode=0o700)
    key_path.write_text(secret[:-1] + "!\n")
    key_path.chmod(0o600)
    with pytest.raises(keys.KeyFileError) as err:
        keys.load(key_path)
    for shown in (err.value, err.value.__cause__, err.value.__context__):
        assert secret[:-1] not in str(shown)


def test_a_key_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(keys.PrivateKey.generate())


@pytest.mark.parametrize("size", [0, 31, 33])
def test_private_key_needs_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32"):
        keys.PrivateKey(bytes(size))


def test_base64_helpers_round_trip() -> None:
    raw = os.urandom(32)
    text = keys.encode_key(raw)
    assert len(text) == 44 and keys.decode_key(text) == raw
    assert keys.decode_key(f"  {text}\n") == raw
    with pytest.raises(ValueError):
        keys.encode_key(raw[:31])
    with pytest.raises(ValueError, match="31 bytes"):
        keys.decode_key(keys.base64.b64encode(raw[:31]).decode())


def test_public_key_matches_x25519() -> None:
    # RFC 7748 section 6.1: Alice's key pair.
    private = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    public = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert keys.public_key_of(private) == public
    assert keys.PrivateKey(private).public_key_b64() == base64.b64encode(public).decode()
