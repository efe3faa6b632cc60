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
        self.rotated_wall = 0.0  # when this agent last rotated the key (unix time); 0: never

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

    def stop(self) -> None:
        pass

    def rotate(self, *, wall: float) -> keys.PrivateKey:
        """A new key, written atomically over the old; the caller puts it on the device."""
        with self._lock:
            self._key = keys.rotate(self.path)
            self.rotated_wall = wall
            return self._key

    def health(self) -> component.Health:
        if self._key is None:
            return component.degraded(f"no key loaded yet from {self.path}")
        return component.ok(f"key loaded, public key {self.public_key}")
