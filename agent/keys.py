"""The node's WireGuard private key: one file on the host that outlives the agent.

Peers know a node by its public key, so a key that changed on every restart would cut every
tunnel to the node until all peers caught up. The key is therefore generated once, written
so that a crash at any point leaves either no file or a whole one, and read back on every
start. A file that is there but wrong (unreadable, malformed, readable by others) is a
problem a person must look at: it is reported with `KeyFileError` and never replaced, since
replacing it would hide a leak or a mistake and change the node's identity behind their back.

The file holds what `wg genkey` prints (base64 and a newline), so `wg` can use it too.
The key itself never appears in a repr, a str, an exception or a log line.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hmac
import os
import pathlib
import stat
import tempfile
from collections.abc import Callable
from typing import Final, TypeAlias

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

DEFAULT_PATH: Final = pathlib.Path("/var/lib/podwire/private.key")
KEY_LEN: Final = 32
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
# How a finished temp file is put in place: link (never replaces) or os.replace.
_Install: TypeAlias = Callable[[str, pathlib.Path], None]
# Longer than any key file we accept, short enough that a wrong file is never read whole.
_READ_LIMIT: Final = 256


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file and says what to do."""

    def __init__(self, path: os.PathLike[str] | str, problem: str, remedy: str):
        super().__init__(f"private key file {os.fspath(path)}: {problem}; {remedy}")
        self.path = pathlib.Path(path)
        self.problem = problem


class PrivateKey:
    """A Curve25519 private key as WireGuard uses it (32 raw bytes).

    Deliberately not a dataclass: its repr and str show only the public key, so passing one to
    a logger or an f-string by mistake leaks nothing.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise ValueError(f"a private key is {KEY_LEN} bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def generate(cls) -> PrivateKey:
        raw = x25519.X25519PrivateKey.generate().private_bytes(
            encoding=serialization.Encoding.Raw,
            format=serialization.PrivateFormat.Raw,
            encryption_algorithm=serialization.NoEncryption(),
        )
        return cls(clamp(raw))

    @classmethod
    def from_b64(cls, text: str) -> PrivateKey:
        """Parse `wg genkey` output; the ValueError it may raise never quotes the text."""
        return cls(decode_key(text))

    @property
    def raw(self) -> bytes:
        """The secret bytes, for the datapath backends only."""
        return self._raw

    def to_b64(self) -> str:
        """The secret in base64, for the key file and the wg UAPI only."""
        return encode_key(self._raw)

    def public_key(self) -> bytes:
        return public_key_of(self._raw)

    def public_key_b64(self) -> str:
        return encode_key(self.public_key())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self.public_key())

    def __repr__(self) -> str:
        return f"PrivateKey(public_key={self.public_key_b64()!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the secret into whatever stores the pickle.
        raise TypeError("a PrivateKey is not picklable")


def encode_key(raw: bytes) -> str:
    """Base64 of a 32-byte key, exactly as `wg` prints keys."""
    if len(raw) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 bytes of a base64 key; surrounding whitespace (the file's newline) is allowed.

    Only the canonical spelling is accepted (what encode_key gives back), so two different
    strings never name the same key. Errors describe the input, never quote it.
    """
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"not base64 ({len(stripped)} characters; a key is 44 characters ending in '=')"
        ) from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"decodes to {len(raw)} bytes, a key is {KEY_LEN}")
    if base64.b64encode(raw).decode("ascii") != stripped:
        raise ValueError("not the canonical base64 spelling of a key")
    return raw


def public_key_of(private_raw: bytes) -> bytes:
    private = x25519.X25519PrivateKey.from_private_bytes(private_raw)
    return private.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def clamp(raw: bytes) -> bytes:
    """Clamp as `wg genkey` does, so our file is what it would have written.

    X25519 clamps at use anyway, so the public key is the same either way.
    """
    key = bytearray(raw)
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def load(path: os.PathLike[str] | str = DEFAULT_PATH) -> PrivateKey:
    """Read an existing key file; raise KeyFileError if it is missing or cannot be used."""
    path = pathlib.Path(path)
    key = _load_if_present(path)
    if key is None:
        raise KeyFileError(
            path, "does not exist", "start the agent once to generate it, or restore it"
        )
    return key


def load_or_create(path: os.PathLike[str] | str = DEFAULT_PATH) -> PrivateKey:
    """The node's key: read from `path`, or generated and written there on first start."""
    path = pathlib.Path(path)
    key = _load_if_present(path)
    if key is not None:
        return key
    _ensure_folder(path)
    key = PrivateKey.generate()
    # link() never replaces: if another agent process (a DaemonSet rolling update with surge)
    # wrote a key in the meantime, we take that one instead of silently overwriting it.
    try:
        _write_atomically(path, key, install=_link_no_replace)
    except FileExistsError:
        return load(path)
    return key


def previous_path(path: os.PathLike[str] | str) -> pathlib.Path:
    """Where a rotation keeps the key it replaces until the rotation completes."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".previous")


def rotate(path: os.PathLike[str] | str = DEFAULT_PATH) -> PrivateKey:
    """Generate a new key and atomically replace the file with it, keeping the old one.

    The old key is first written (atomically, mode 0600) to `previous_path(path)`, where it
    stays until the caller has put the new key on the device and published it and calls
    `finish_rotation`: a leftover previous file at start says a rotation was cut short. If
    writing fails the old file is left as it was and KeyFileError is raised; the caller must
    keep using the old key then.
    """
    path = pathlib.Path(path)
    _ensure_folder(path)
    old = load(path)
    _write_atomically(previous_path(path), old, install=os.replace)
    key = PrivateKey.generate()
    _write_atomically(path, key, install=os.replace)
    return key


def load_previous(path: os.PathLike[str] | str = DEFAULT_PATH) -> PrivateKey | None:
    """The key a rotation replaced, while that rotation is not complete; else None."""
    return _load_if_present(previous_path(path))


def finish_rotation(path: os.PathLike[str] | str = DEFAULT_PATH) -> None:
    """The rotation is complete: the previous key is no longer needed, and goes."""
    previous = previous_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(previous)
        _fsync_folder(previous)


def date(path: os.PathLike[str] | str, wall: float) -> None:
    """Sets when the key in the file counts as made (its modification time)."""
    os.utime(path, (wall, wall), follow_symlinks=False)


def made_at(path: os.PathLike[str] | str = DEFAULT_PATH) -> float:
    """When the key in the file was written (unix time): its age, across restarts."""
    return os.stat(path, follow_symlinks=False).st_mtime


_INSPECT: Final = "check the path and the file; it is never replaced automatically"


def _load_if_present(path: pathlib.Path) -> PrivateKey | None:
    if not _check_folder(path, missing_ok=True):
        return None
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the agent. O_NOFOLLOW: a
        # symlink planted there must not make the agent use (or reveal) another file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(
                path,
                "is a symbolic link, which the agent never follows",
                "replace it with the key file itself (mode 0600), or delete it and restart"
                " the agent to generate a new key",
            ) from None
        raise _open_error(path, exc) from None
    try:
        _check_file(path, os.fstat(fd))
        data = _read_all(path, fd)
    finally:
        os.close(fd)
    return _parse(path, data)


def _open_error(path: pathlib.Path, exc: OSError) -> KeyFileError:
    if isinstance(exc, PermissionError):
        return KeyFileError(
            path, "cannot be read (permission denied)", "run the agent as the file's owner (root)"
        )
    return KeyFileError(path, f"cannot be opened ({exc.strerror})", _INSPECT)


def _parse(path: pathlib.Path, data: bytes) -> PrivateKey:
    try:
        return PrivateKey.from_b64(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        problem = "is not ASCII text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise KeyFileError(
            path,
            f"does not hold a WireGuard private key: {problem}",
            "restore the key from a backup, or delete the file and restart the agent to"
            " generate a new key (peers pick up the new public key automatically)",
        ) from None


def _check_folder(path: pathlib.Path, *, missing_ok: bool) -> bool:
    """The key's folder is a folder of the agent's own, closed to everyone else (0700).

    Whoever can write the folder can swap the key for one they know, so a folder writable by
    group or others, or owned by someone else, is refused. One that others can only read or
    enter (a hostPath made by the kubelet is 0755) is tightened to 0700. False: no folder.
    """
    folder = path.parent
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        if missing_ok:
            return False
        raise KeyFileError(path, f"its folder {folder} does not exist", _INSPECT) from None
    except OSError as exc:
        raise KeyFileError(path, f"its folder cannot be read ({exc.strerror})", _INSPECT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(path, f"{folder} is not a folder", _INSPECT)
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            path,
            f"its folder {folder} is owned by uid {st.st_uid}, not by the agent"
            f" (uid {os.geteuid()})",
            f"run `chown {os.geteuid()} {folder}` if that user is trusted",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise KeyFileError(
            path,
            f"its folder is writable by group or others (mode {mode:04o})",
            f"run `chmod 700 {folder}`; if the key may have been swapped, delete it and"
            " restart the agent to generate a new key",
        )
    if mode & 0o077:
        try:
            os.chmod(folder, DIR_MODE)
        except OSError as exc:
            raise KeyFileError(
                path, f"its folder cannot be closed to others ({exc.strerror})", _INSPECT
            ) from None
    return True


def _check_file(path: pathlib.Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(path, "is not a regular file", _INSPECT)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            path,
            f"is accessible by group or others (mode {mode:04o})",
            f"run `chmod 600 {path}`; if others may have read it, delete it and restart the"
            " agent to generate a new key",
        )
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            path,
            f"is owned by uid {st.st_uid}, not by the agent (uid {os.geteuid()})",
            f"run `chown {os.geteuid()} {path}` if that user is trusted, else delete it and"
            " restart the agent to generate a new key",
        )


def _read_all(path: pathlib.Path, fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= _READ_LIMIT:
        try:
            chunk = os.read(fd, _READ_LIMIT + 1 - size)
        except OSError as exc:
            raise KeyFileError(path, f"cannot be read ({exc.strerror})", _INSPECT) from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > _READ_LIMIT:
        raise KeyFileError(
            path,
            f"is too large for a key file (over {_READ_LIMIT} bytes)",
            "check that the path points at the key file written by the agent or `wg genkey`",
        )
    return b"".join(chunks)


def _ensure_folder(path: pathlib.Path) -> None:
    """The key's folder exists, 0700, the agent's own (see _check_folder)."""
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=False)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyFileError(
            path, f"its folder cannot be created ({exc.strerror})", "create it (mode 0700)"
        ) from None
    _check_folder(path, missing_ok=False)  # also tightens what mkdir's umask left open


def _link_no_replace(src: str, dst: pathlib.Path) -> None:
    os.link(src, dst)
    # The key is in place; a temp name left behind is untidy, not a reason to fail the start.
    with contextlib.suppress(OSError):
        os.unlink(src)


def _write_atomically(
    path: pathlib.Path,
    key: PrivateKey,
    *,
    install: _Install,
) -> None:
    """Write to a temp file in the same folder, fsync it, install it under `path`, fsync the
    folder: after a crash the file is either the old one or the whole new one."""
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise KeyFileError(
            path, f"cannot write a new key in {folder} ({exc.strerror})", _FIX_FOLDER
        ) from None
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            data = (key.to_b64() + "\n").encode("ascii")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        install(tmp, path)
    except FileExistsError:
        _remove_quietly(tmp)
        raise
    except OSError as exc:
        _remove_quietly(tmp)
        raise KeyFileError(path, f"cannot write a new key ({exc.strerror})", _FIX_FOLDER) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_folder(path)


_FIX_FOLDER: Final = "check that its folder exists, is writable by the agent and has free space"


def _fsync_folder(path: pathlib.Path) -> None:
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(path, f"cannot sync its folder ({exc.strerror})", _FIX_FOLDER) from None
    try:
        os.fsync(dfd)
    except OSError as exc:
        # Some filesystems cannot fsync a folder; the rename itself has happened.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise KeyFileError(
                path, f"cannot sync its folder ({exc.strerror})", _FIX_FOLDER
            ) from None
    finally:
        os.close(dfd)


def _remove_quietly(tmp: str) -> None:
    # The write already failed; that error is the one the user needs to see.
    with contextlib.suppress(OSError):
        os.unlink(tmp)
