"""The node's private key as a component: loaded (or made) at start, rotated on request.

The file itself is `keys`' business (mode 0600, atomic writes, never followed into a secret
leak); this component holds the key in use and knows when it was last rotated.
"""

from __future__ import annotations

import pathlib
import threading

from podwire.agent import component, keys


class KeyStore:
    name = "keystore"

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._key: keys.PrivateKey | None = None
        self._lock = threading.Lock()
        self.made_wall = 0.0  # when the key in use was made (unix time), from its file
        self.rotated_wall = 0.0  # when this agent last rotated the key; 0: not since it started
        # A rotation cut short (the agent stopped between storing a new key and publishing
        # it): set at start when the previous key was still kept; the controller finishes it.
        self.interrupted = False

    @property
    def key(self) -> keys.PrivateKey:
        if self._key is None:
            raise RuntimeError("the key store has not started")
        return self._key

    @property
    def public_key(self) -> str:
        return self._key.public_key_b64() if self._key else ""

    def start(self) -> None:
        """Loads the key, or makes one on first start; raises keys.KeyFileError if unusable."""
        with self._lock:
            self._key = keys.load_or_create(self.path)
            self.made_wall = keys.made_at(self.path)
            self.interrupted = keys.load_previous(self.path) is not None

    def stop(self) -> None:
        pass

    def rotate(self, *, wall: float) -> keys.PrivateKey:
        """A new key, written atomically over the old, which is kept until `finish`, and dated
        `wall` (the key file's time is the key's age)."""
        with self._lock:
            self._key = keys.rotate(self.path)
            keys.date(self.path, wall)  # its age after a restart is the one reported now
            self.made_wall = self.rotated_wall = wall
            self.interrupted = False
            return self._key

    def finish(self) -> None:
        """The new key is on the device and published: the kept previous key goes."""
        with self._lock:
            keys.finish_rotation(self.path)
            self.interrupted = False

    def health(self) -> component.Health:
        if self._key is None:
            return component.degraded(f"no key loaded yet from {self.path}")
        return component.ok(f"key loaded, public key {self.public_key}")
