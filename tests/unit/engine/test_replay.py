"""The replay window against a numbered table of cases, then against a naive model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podwire.agent.engine import constants, replay

W = replay.WINDOW_SIZE
TOTAL = replay.TOTAL_BITS
LIMIT = constants.REJECT_AFTER_MESSAGES

# (counter, accepted?) in order, all against one window.
CASES = [
    (0, True),  # 1: the first counter
    (1, True),  # 2: in order
    (1, False),  # 3: duplicate
    (9, True),  # 4: skipping ahead
    (8, True),  # 5: late, within the window
    (7, True),  # 6: late, within the window
    (7, False),  # 7: late duplicate
    (W, True),  # 8: greatest is now W
    (W - 1, True),  # 9
    (W - 1, False),  # 10
    (W - 2, True),  # 11
    (2, True),  # 12: still inside: greatest - W <= 2
    (2, False),  # 13
    (W + 16, True),  # 14: greatest moves on by 16
    (3, False),  # 15: fell out of the window
    (W + 16, False),  # 16
    (W * 4, True),  # 17: far ahead: the whole ring is reused
    (W * 4 - 1, True),  # 18: a slot cleared by the jump accepts again
    (10, False),  # 19: far too old
    (W * 3, True),  # 20: exactly the window's edge, greatest - W
    (W * 3 - 1, False),  # 21: one past the edge
    (W * 3, False),  # 22: the edge, replayed
    (W * 4 + TOTAL, True),  # 23: one whole ring ahead: same bit position as case 17
    (W * 4, False),  # 24: now out of the window
    (W * 4 + TOTAL - 1, True),  # 25
    (LIMIT, False),  # 26: at the limit: never
    (LIMIT - 1, True),  # 27: the last usable counter
    (LIMIT, False),  # 28
    (LIMIT - 1, False),  # 29: replayed
    (LIMIT - 2, True),  # 30
    (LIMIT + 1, False),  # 31: beyond the limit
    (2**64 - 1, False),  # 32: the largest counter on the wire
    (LIMIT - 2, False),  # 33
    (LIMIT - 3, True),  # 34
    (0, False),  # 35: ancient
]


def test_replay_window_table() -> None:
    window = replay.ReplayWindow()
    results = [window.validate(counter) for counter, _ in CASES]
    failures = [
        f"case {number}: counter {counter} gave {got}, expected {want}"
        for number, ((counter, want), got) in enumerate(zip(CASES, results, strict=True), 1)
        if got != want
    ]
    assert not failures, "\n".join(failures)


def test_the_window_holds_at_least_2048_counters() -> None:
    window = replay.ReplayWindow()
    assert window.validate(5000)
    assert all(window.validate(c) for c in range(5000 - 2048, 5000))
    assert not window.validate(5000)
    assert window.validate(5001)


@pytest.mark.parametrize("start", [0, 63, 64, 8191, 2**40 + 7])
def test_every_counter_once_in_order_then_none_again(start: int) -> None:
    window = replay.ReplayWindow()
    counters = range(start, start + 3 * TOTAL)
    assert all(window.validate(c) for c in counters)
    assert not any(window.validate(c) for c in range(start + 2 * TOTAL, start + 3 * TOTAL))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 3 * TOTAL),
            st.integers(0, 40).map(lambda k: k * 64),
            st.integers(LIMIT - 3 * TOTAL, 2**64 - 1),
        ),
        max_size=200,
    )
)
def test_window_matches_a_naive_model(counters: list[int]) -> None:
    window = replay.ReplayWindow()
    seen: set[int] = set()
    greatest: int | None = None
    for counter in counters:
        expected = (
            counter < LIMIT
            and counter not in seen
            and (greatest is None or counter >= greatest - W)
        )
        assert window.validate(counter) == expected, counter
        if expected:
            seen.add(counter)
            greatest = counter if greatest is None else max(greatest, counter)
