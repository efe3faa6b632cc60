"""Who leads, read from a Lease: pure, so the timing rules are tested with a fake clock.

A replica may take the lease when its holder has stopped renewing it for a lease duration.
Clocks of different machines disagree, so, as client-go does, the time a replica first saw the
current renewal on its own monotonic clock counts, not the renewTime the holder wrote. One
refinement: the renewTime tells how old the renewal already was when we saw it, and we believe
it up to one retry period, so that a waiting replica takes over within the lease duration of
the holder's last renewal rather than a retry period later, while a clock that is wrong by
more than that can make us early by one retry period at most.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """The Lease's spec, as leader election uses it."""

    holder: str
    duration: float
    renew_time: float | None  # epoch seconds, as the holder wrote it
    acquire_time: str | None
    transitions: int
    resource_version: str | None

    @property
    def released(self) -> bool:
        return not self.holder


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """When (on our monotonic clock) we take the current renewal to have happened."""

    key: tuple[str, float | None, str | None]
    renewed_mono: float


def parse_time(text: object) -> float | None:
    """Epoch seconds from an RFC 3339 time (Time or MicroTime); None if absent or malformed."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def micro_time(epoch: float) -> str:
    """A metav1.MicroTime, as Leases carry them."""
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read(lease: Obj) -> Record:
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    transitions = spec.get("leaseTransitions")
    return Record(
        holder=str(spec.get("holderIdentity") or ""),
        duration=float(duration) if isinstance(duration, int) and duration > 0 else 0.0,
        renew_time=parse_time(spec.get("renewTime")),
        acquire_time=spec.get("acquireTime"),
        transitions=transitions if isinstance(transitions, int) else 0,
        resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
    )


def observe(
    record: Record,
    previous: Observation | None,
    *,
    now_mono: float,
    now_wall: float,
    trust: float,
) -> Observation:
    """The observation of record: kept while the renewal is the one seen before, else new."""
    key = (record.holder, record.renew_time, record.resource_version)
    if previous is not None and previous.key == key:
        return previous
    age = 0.0 if record.renew_time is None else now_wall - record.renew_time
    return Observation(key, now_mono - min(max(age, 0.0), trust))


def expires_in(record: Record, seen: Observation, *, now_mono: float) -> float:
    """Seconds until a waiting replica may take the lease; 0 or less: now."""
    if record.released:
        return 0.0
    return seen.renewed_mono + record.duration - now_mono


def spec(
    identity: str,
    *,
    duration: float,
    now_wall: float,
    previous: Record | None,
) -> Obj:
    """The Lease spec for identity holding it from now: a renewal keeps acquireTime and the
    transition count, a takeover moves them."""
    taking_over = previous is None or previous.holder != identity
    acquired = micro_time(now_wall) if taking_over or previous is None else previous.acquire_time
    transitions = 0 if previous is None else previous.transitions + (1 if taking_over else 0)
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": max(1, round(duration)),
        "acquireTime": acquired,
        "renewTime": micro_time(now_wall),
        "leaseTransitions": transitions,
    }


def released_spec(previous: Record, *, now_wall: float) -> Obj:
    """What a leader that stops writes, so that a waiting replica takes over at once."""
    return {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": previous.acquire_time,
        "renewTime": micro_time(now_wall),
        "leaseTransitions": previous.transitions,
    }
