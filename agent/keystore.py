"""The node's private key as a component: loaded (or made) at start, rotated on request.

The file itself is `keys`' business (mode 0600, atomic writes, never followed into a secret
leak); this component holds the key in use and knows when it was last rotated. With lanes, each
lane beyond the first has a key file of its own (`lane_paths`), held by a store of its own in
`lanes`: they load, rotate and finish with lane 0's, so one rotation renews every lane.

The key files of lanes the node no longer has (`lanes` lowered) are removed at start, with any
previous key a rotation kept for them: a private key no device uses is only a secret to leak.
Raising `lanes` again makes a new key for the lane, published like any.
"""

from __future__ import annotations

import os
import pathlib
import threading

from podwire.agent import component, keys, log


class KeyStore:
    name = "keystore"

    def __init__(
        self,
        path: pathlib.Path,
        *,
        lane_paths: tuple[pathlib.Path, ...] = (),
        retired_paths: tuple[pathlib.Path, ...] = (),
    ) -> None:
        self.path = path
        self.lanes = tuple(KeyStore(p) for p in lane_paths)  # lanes 1..N-1
        self.retired_paths = retired_paths  # the key files of lanes above N-1, to remove
        self.retired: list[pathlib.Path] = []  # what start removed of them
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

    def lane_key(self, lane: int) -> keys.PrivateKey:
        """Lane `lane`'s key (lane 0: `key`)."""
        return self.key if lane == 0 else self.lanes[lane - 1].key

    def start(self) -> None:
        """Loads the key, or makes one on first start; raises keys.KeyFileError if unusable."""
        with self._lock:
            self._key = keys.load_or_create(self.path)
            self.made_wall = keys.made_at(self.path)
            self.interrupted = keys.load_previous(self.path) is not None
        for lane in self.lanes:
            lane.start()
        self.interrupted = self.interrupted or any(lane.interrupted for lane in self.lanes)
        self.retired = self._remove_retired()

    def _remove_retired(self) -> list[pathlib.Path]:
        """Removes what it can; a file it cannot remove is logged (by name) and left."""
        logger = log.get("keystore")
        removed = []
        for path in self.retired_paths:
            for file in (path, keys.previous_path(path)):
                try:
                    os.unlink(file)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    logger.warning("retired_lane_key_kept", file=str(file), error=e.strerror)
                    continue
                removed.append(file)
        if removed:
            logger.info("retired_lane_keys_removed", files=[str(p) for p in removed])
        return removed

    def stop(self) -> None:
        pass

    def rotate(self, *, wall: float) -> keys.PrivateKey:
        """A new key, written atomically over the old, which is kept until `finish`, and dated
        `wall` (the key file's time is the key's age). Every lane's key is renewed, lane 0's
        last: a crash in between leaves previous keys on disk, so the next start resumes."""
        for lane in self.lanes:
            lane.rotate(wall=wall)
        with self._lock:
            self._key = keys.rotate(self.path)
            keys.date(self.path, wall)  # its age after a restart is the one reported now
            self.made_wall = self.rotated_wall = wall
            self.interrupted = False
            return self._key

    def finish(self) -> None:
        """The new key is on the device and published: the kept previous key goes."""
        for lane in self.lanes:
            lane.finish()
        with self._lock:
            keys.finish_rotation(self.path)
            self.interrupted = False

    def health(self) -> component.Health:
        if self._key is None:
            return component.degraded(f"no key loaded yet from {self.path}")
        return component.ok(f"key loaded, public key {self.public_key}")
