"""Who may take the lease, when: the timing rules of leader election on a fake clock."""

from __future__ import annotations

from podwire.operator import election

TRUST = 2.0  # the retry period


def record(holder: str = "a", *, renewed: float | None = 1000.0, rv: str = "1") -> election.Record:
    return election.Record(holder, 15.0, renewed, None, 0, rv)


def test_a_lease_renewed_just_now_expires_a_lease_duration_later() -> None:
    seen = election.observe(
        record(renewed=1000.0), None, now_mono=50.0, now_wall=1000.0, trust=TRUST
    )
    assert election.expires_in(record(), seen, now_mono=50.0) == 15.0
    assert election.expires_in(record(), seen, now_mono=65.0) == 0.0


def test_a_renewal_seen_late_counts_from_when_it_was_made_up_to_the_retry_period() -> None:
    # Seen 1.5 s after it was written: it expires 13.5 s from now, as for its holder.
    seen = election.observe(
        record(renewed=1000.0), None, now_mono=50.0, now_wall=1001.5, trust=TRUST
    )
    assert election.expires_in(record(), seen, now_mono=50.0) == 13.5
    # A clock far ahead of the holder's cannot make us take over early by more than TRUST.
    skewed = election.observe(
        record(renewed=1000.0), None, now_mono=50.0, now_wall=1100.0, trust=TRUST
    )
    assert election.expires_in(record(), skewed, now_mono=50.0) == 15.0 - TRUST
    # Nor can one behind it make us later than a lease duration from when we saw it.
    behind = election.observe(
        record(renewed=1000.0), None, now_mono=50.0, now_wall=990.0, trust=TRUST
    )
    assert election.expires_in(record(), behind, now_mono=50.0) == 15.0


def test_the_same_renewal_seen_again_keeps_its_time_and_a_new_one_restarts_it() -> None:
    first = election.observe(record(rv="1"), None, now_mono=50.0, now_wall=1000.0, trust=TRUST)
    again = election.observe(record(rv="1"), first, now_mono=60.0, now_wall=1010.0, trust=TRUST)
    assert again == first
    renewed = record(renewed=1005.0, rv="2")
    later = election.observe(renewed, first, now_mono=60.0, now_wall=1005.0, trust=TRUST)
    assert election.expires_in(renewed, later, now_mono=60.0) == 15.0


def test_a_released_lease_may_be_taken_at_once() -> None:
    released = record(holder="")
    seen = election.observe(released, None, now_mono=50.0, now_wall=1000.0, trust=TRUST)
    assert election.expires_in(released, seen, now_mono=50.0) == 0.0


def test_a_renewal_keeps_the_acquire_time_and_a_takeover_counts_a_transition() -> None:
    mine = election.read({"spec": election.spec("a", duration=15, now_wall=1000.0, previous=None), "metadata": {"resourceVersion": "7"}})  # fmt: skip
    assert (mine.holder, mine.duration, mine.transitions, mine.resource_version) == (
        "a",
        15.0,
        0,
        "7",
    )
    renewed = election.spec("a", duration=15, now_wall=1005.0, previous=mine)
    assert renewed["acquireTime"] == mine.acquire_time
    assert renewed["leaseTransitions"] == 0
    assert election.parse_time(renewed["renewTime"]) == 1005.0
    taken = election.spec("b", duration=15, now_wall=1020.0, previous=mine)
    assert taken["leaseTransitions"] == 1
    assert election.parse_time(taken["acquireTime"]) == 1020.0


def test_times_are_read_as_the_apiserver_writes_them() -> None:
    assert election.parse_time("2026-01-01T00:00:00Z") == 1767225600.0
    assert election.parse_time("2026-01-01T00:00:00.250000Z") == 1767225600.25
    assert election.parse_time(election.micro_time(1767225600.5)) == 1767225600.5
    assert election.parse_time("yesterday") is None
    assert election.parse_time(None) is None
